"""`LRFinder`: difflr's LR range test as a callback in a ``Trainer`` of your own.

It takes the arguments of Lightning's ``LearningRateFinder`` and runs the same transaction as
``Learner.lr_find`` (`difflr.training.lr_finder.range_test`): a sweep that keeps the ratios
between layer groups, fastai's suggestion functions, and an exact restore of weights, buffers,
optimizer state, flags, modes and RNG states. The sweep trains in a Trainer of its own, on the
model's device, with the optimizer and the training loader of your Trainer, so your Trainer's
step count, callbacks and logs never see it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
from typing_extensions import override

from difflr.callbacks.recorder import Recorder
from difflr.callbacks.scheduler import ParamScheduler, single_optimizer
from difflr.callbacks.unfreezing import GradualUnfreezing
from difflr.optim.param_groups import layer_group_index, read_hypers
from difflr.policy.lr import LRSpec
from difflr.policy.schedules import Schedule
from difflr.policy.suggestions import SuggestedLRs, SuggestionFunc, suggestion_funcs, valley
from difflr.training.lr_finder import SWEEP_MODES, range_test, sweep_bounds, sweep_schedule
from difflr.training.module import training_with
from difflr.training.trainers import quiet_lightning
from difflr.utils.checks import check_choice, check_int, check_positive, user_stacklevel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LRFinder", "LRSweep"]

#: The module attributes Lightning's finder looks for when ``attr_name`` is empty.
LR_ATTRS = ("lr", "learning_rate")


@dataclass(frozen=True)
class LRSweep:
    """One range test of an `LRFinder`.

    Attributes:
        epoch: The epoch at whose start it ran (0 for the fit's start).
        lrs: ``(n_steps, n_groups)`` every layer group's LR at each step of the sweep.
        losses: ``(n_steps,)`` the smoothed training loss after each step.
        suggestions: What ``Learner.lr_find`` returns: one field per suggestion function
            (``None`` without suggestion functions).
        points: ``{name: (lr, loss)}``, each suggestion's point on the curve.
    """

    epoch: int
    lrs: np.ndarray
    losses: np.ndarray
    suggestions: SuggestedLRs | None
    points: dict[str, tuple[float, float]]


class LRFinder(Callback):
    """The LR range test in your own ``Trainer``: at the fit's start (and, with ``milestones``, at
    the start of those epochs) train ``num_training_steps`` steps with a growing LR, read the
    suggestions off the loss curve, put everything back as it was, and apply the suggestion.

    Step ``i`` uses ``min_lr * (max_lr / min_lr) ** (i / num_training_steps)`` for every layer
    group (``"exponential"``) or ``min_lr + (max_lr - min_lr) * i / num_training_steps``
    (``"linear"``), so list or slice bounds keep the ratios between groups; the suggestions are
    read on the last (head) group's LR. On the same model, data and seed, ``suggestions`` equal
    what ``Learner.lr_find`` returns with the same arguments (``start_lr=min_lr``,
    ``end_lr=max_lr``, ``num_it=num_training_steps``, ``stop_div=early_stop_threshold is not
    None``): both run `difflr.training.lr_finder.range_test`.

    The sweep trains in a Trainer of its own (on the model's device, with your Trainer's
    optimizer, training loader, precision, gradient accumulation, gradient clipping and
    ``limit_train_batches``), so your Trainer's step count, callbacks, loggers and checkpoints
    never see it. Weights, buffers, gradients, optimizer state, ``requires_grad`` flags,
    train/eval modes and the torch, CUDA, numpy and python RNG states are restored bit for bit,
    also when the sweep raises.

    ``update_attr=True`` applies the first suggestion ``s``, an LR of the head group:

    - with difflr's `ParamScheduler` in the Trainer, its LR schedule is multiplied by one factor
      so that the head group's peak LR (the largest over ``pct`` in [0, 1], read on a grid of
      10001 points) is ``s``: shape, momentum and ratios between groups kept, and a milestone's
      sweep rescales the steps still to come;
    - without one, every param group's current LR is multiplied so that the head group's is
      ``s`` (with one param group: Lightning's rule, ``lr = s``);
    - in both cases, the module's ``attr_name`` attribute (else ``lr`` or ``learning_rate``, in
      the module or its ``hparams``), when it has one, is set to ``s`` as Lightning does.

    With `GradualUnfreezing` in the Trainer, ``update_attr=True`` is refused (its plan holds the
    stages' LRs); pass ``update_attr=False``, place the finder after it in ``callbacks`` and read
    each stage's sweep in ``runs``.

    Args:
        min_lr: First LR: a float, a list per layer group or a ``slice`` (see ``expand_lrs``).
        max_lr: LR the sweep would reach at step ``num_training_steps``; above ``min_lr`` for
            every group.
        num_training_steps: Optimizer steps of the sweep (>= 2); the loader repeats as needed.
        mode: ``"exponential"`` or ``"linear"`` growth of the LR.
        early_stop_threshold: Stop once the smoothed loss exceeds this many times the best one,
            or is not finite; ``None`` never stops early.
        update_attr: Apply the first suggestion (see above).
        attr_name: The module's LR attribute; ``""`` looks for ``lr`` and ``learning_rate``.
        suggest_funcs: Suggestion functions ``(lrs, losses) -> lr`` (``valley``, ``slide``,
            ``minimum``, ``steep`` or your own); ``None`` or ``()`` for none.
        milestones: Epochs (0-based) at whose start the sweep runs again, after the one at the
            fit's start. Place the finder after the callbacks that change the model at those
            epochs (`GradualUnfreezing`).
        show_plot: Show each sweep's loss-vs-LR figure (inline in Jupyter).

    Attributes:
        runs: Every sweep of the fit, an `LRSweep` each, in order.

    Raises:
        ValueError: An unknown ``mode``, ``num_training_steps < 2``, ``min_lr >= max_lr`` (for
            any group), a bound that is not positive, ``update_attr=True`` without suggestion
            functions or beside `GradualUnfreezing`; at the fit's setup, a strategy other than a
            single device's (see below).
        AttributeError: ``attr_name`` names no attribute of the module or its ``hparams``.

    Under DDP, FSDP, ``ModelParallelStrategy`` or DeepSpeed it refuses to start: its sweep trains
    in a Trainer of its own, which cannot join your Trainer's processes. ``Learner.lr_find``
    supports DDP and ``ModelParallelStrategy``; or run the finder in a single-device Trainer
    before the distributed fit.

    Examples:
        >>> from difflr import LRFinder, slide
        >>> finder = LRFinder(min_lr=1e-7, max_lr=10, suggest_funcs=(valley, slide))
        >>> # trainer = pl.Trainer(callbacks=[finder]); trainer.fit(module, train_dl)
        >>> # finder.suggestions.valley, finder.plot()
    """

    SUPPORTED_MODES = SWEEP_MODES

    def __init__(
        self,
        min_lr: LRSpec = 1e-8,
        max_lr: LRSpec = 1.0,
        num_training_steps: int = 100,
        mode: str = "exponential",
        early_stop_threshold: float | None = 4.0,
        update_attr: bool = True,
        attr_name: str = "",
        *,
        suggest_funcs: SuggestionFunc | Sequence[SuggestionFunc] | None = (valley,),
        milestones: Sequence[int] = (),
        show_plot: bool = False,
    ) -> None:
        self.mode = check_choice(
            mode.lower() if isinstance(mode, str) else mode, "mode", SWEEP_MODES
        )
        self.num_training_steps = check_int(
            num_training_steps, "num_training_steps", 2, what="sweep steps"
        )
        if not isinstance(min_lr, (list, tuple, slice, np.ndarray)) and not isinstance(
            max_lr, (list, tuple, slice, np.ndarray)
        ):
            sweep_bounds(min_lr, max_lr, 1, ("min_lr", "max_lr"), _EXAMPLE)  # lists: at the fit
        self.min_lr, self.max_lr = min_lr, max_lr
        self.early_stop_threshold = (
            None
            if early_stop_threshold is None
            else check_positive(early_stop_threshold, "early_stop_threshold")
        )
        self.funcs = () if suggest_funcs is None else suggestion_funcs(suggest_funcs)
        if update_attr and not self.funcs:
            raise ValueError(
                "update_attr=True applies the first suggestion, but suggest_funcs is empty; pass "
                "suggestion functions (e.g. suggest_funcs=(valley,)) or update_attr=False."
            )
        self.update_attr = bool(update_attr)
        if not isinstance(attr_name, str):
            raise TypeError(f"attr_name must be a str ('' looks for lr), got {attr_name!r}.")
        self.attr_name = attr_name
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise TypeError(f"milestones must be a list of epochs, got {milestones!r}.")
        self.milestones = tuple(
            sorted({check_int(m, "milestone", 0, what="an epoch") for m in milestones})
        )
        self.show_plot = show_plot
        self.runs: list[LRSweep] = []
        self._recorder = Recorder(log_hypers=False)
        self._swept_epoch: int | None = None

    # ----------------------------------------------------------------------------- results
    @property
    def suggestions(self) -> SuggestedLRs | None:
        """The last sweep's suggestions, as ``Learner.lr_find`` returns them (``None`` before
        a sweep or without suggestion functions)."""
        return self.runs[-1].suggestions if self.runs else None

    @property
    def lrs(self) -> np.ndarray:
        """``(n_steps, n_groups)``: the last sweep's LRs."""
        return self._last().lrs

    @property
    def losses(self) -> np.ndarray:
        """``(n_steps,)``: the last sweep's smoothed losses."""
        return self._last().losses

    def plot(self, run: int = -1, skip_end: int = 5) -> Figure:
        """A sweep's loss against the head group's LR, suggestions marked (as
        ``learn.recorder.plot_lr_find()``).

        Args:
            run: Which of `runs` (default: the last).
            skip_end: Steps left out at the end, where the loss diverges.
        """
        from difflr.plotting import plot_lr_find

        sweep = self._last() if run == -1 else self.runs[run]
        n = min(len(sweep.lrs), len(sweep.losses))
        return plot_lr_find(sweep.lrs[:n, -1], sweep.losses[:n], sweep.points, min(skip_end, n - 1))

    def _last(self) -> LRSweep:
        if not self.runs:
            raise ValueError("LRFinder has not swept yet; it runs at the start of trainer.fit.")
        return self.runs[-1]

    # ----------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, SingleDeviceStrategy):
            raise ValueError(
                f"LRFinder cannot sweep under {type(strategy).__name__} (world size "
                f"{trainer.world_size}): its sweep trains in a Trainer of its own, which cannot "
                "join your Trainer's processes or shards. Use difflr.Learner(...).lr_find() "
                "(it supports DDP and ModelParallelStrategy), or run LRFinder in a single-device "
                "Trainer before the distributed fit."
            )
        if trainer.limit_train_batches == 0:
            raise ValueError(
                "limit_train_batches=0 leaves LRFinder's sweep no batch to train on; drop "
                "limit_train_batches, or pass a positive one."
            )
        if self.update_attr:
            if any(isinstance(cb, GradualUnfreezing) for cb in trainer.callbacks):
                raise ValueError(
                    "LRFinder(update_attr=True) cannot change a GradualUnfreezing plan's LRs (the "
                    "plan holds them); pass update_attr=False and read finder.suggestions (or "
                    "finder.runs, one per milestone), then set the stages' lr_max."
                )
            if self.attr_name and not lightning_hasattr(pl_module, self.attr_name):
                raise AttributeError(
                    f"attr_name={self.attr_name!r}, but {type(pl_module).__name__} has no such "
                    "attribute, nor its hparams; pass the name of its LR attribute, or "
                    "attr_name='' (lr or learning_rate, where present)."
                )
        self.runs = []
        self._swept_epoch = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        single_optimizer(trainer)  # one optimizer, checked before anything changes

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lr_find(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.milestones and epoch != self._swept_epoch:
            self.lr_find(trainer, pl_module)

    # ----------------------------------------------------------------------------- the sweep
    def lr_find(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SuggestedLRs | None:
        """Sweep now (the hooks call this; a subclass may call it from other hooks), keep the
        sweep in `runs` and, with ``update_attr``, apply its first suggestion.

        Returns:
            The sweep's suggestions (``None`` without suggestion functions).
        """
        if trainer.fast_dev_run:
            warnings.warn(
                "LRFinder skips its sweep under fast_dev_run.", stacklevel=user_stacklevel()
            )
            return None
        optimizer = single_optimizer(trainer)
        n_groups = max(layer_group_index(optimizer)) + 1
        starts, ends = sweep_bounds(
            self.min_lr, self.max_lr, n_groups, ("min_lr", "max_lr"), _EXAMPLE
        )
        loader = trainer.train_dataloader
        suggested, _ = range_test(
            pl_module,
            optimizer,
            self._recorder,
            lambda callbacks: _sweep_trainer(
                trainer, self.num_training_steps, [*callbacks, self._recorder]
            ),
            lambda sweep, scheduler: _sweep_fit(trainer, sweep, pl_module, optimizer, loader),
            sweep_schedule(starts, ends, self.mode),
            self.num_training_steps,
            stop_factor=self.early_stop_threshold,
            funcs=self.funcs,
            show_plot=self.show_plot,
        )
        rec = self._recorder
        self.runs.append(
            LRSweep(trainer.current_epoch, rec.lrs, rec.losses, suggested, rec.lr_find_points)
        )
        self._swept_epoch = trainer.current_epoch
        if self.update_attr and suggested is not None:
            self._apply(trainer, pl_module, optimizer, float(suggested[0]))
        return suggested

    def _apply(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        lr: float,
    ) -> None:
        """Make ``lr`` the head group's LR (see the class docstring)."""
        names = (self.attr_name,) if self.attr_name else LR_ATTRS
        found = next((name for name in names if lightning_hasattr(pl_module, name)), None)
        if found is not None:
            lightning_setattr(pl_module, found, lr)
        schedulers = [cb for cb in trainer.callbacks if isinstance(cb, ParamScheduler)]
        if not schedulers:
            factor = lr / read_hypers(optimizer)[0][-1]
            for group in optimizer.param_groups:
                group["lr"] *= factor
            return
        for scheduler in schedulers:
            head_peak = max(
                float(np.asarray(scheduler.lr_sched(pct), dtype=float).reshape(-1)[-1])
                for pct in PEAK_GRID
            )
            scheduler.lr_sched = _Scaled(scheduler.lr_sched, lr / head_peak)
            total = scheduler.total_steps or trainer.estimated_stepping_batches
            if np.isfinite(total):
                scheduler.attach(optimizer, total)  # this step's LRs from the scaled schedule


#: Where a `ParamScheduler`'s schedule is read for its peak (``pct`` in [0, 1]).
PEAK_GRID = np.linspace(0.0, 1.0, 10001)
_EXAMPLE = "LRFinder(min_lr=1e-8, max_lr=1)"


class _Scaled:
    """A schedule multiplied by ``factor``; scaling it again scales the original."""

    def __init__(self, schedule: Schedule, factor: float) -> None:
        if isinstance(schedule, _Scaled):
            factor *= schedule.factor
            schedule = schedule.schedule
        self.schedule, self.factor = schedule, factor

    def __call__(self, pct: float) -> np.ndarray:
        return self.factor * np.asarray(self.schedule(pct), dtype=float)


def _sweep_trainer(outer: pl.Trainer, num_it: int, callbacks: Sequence[pl.Callback]) -> pl.Trainer:
    """A quiet single-device Trainer for the sweep, with what of ``outer`` shapes a step."""
    device = outer.strategy.root_device
    with quiet_lightning():
        return pl.Trainer(
            accelerator=device.type,
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision=outer.precision,
            accumulate_grad_batches=outer.accumulate_grad_batches,
            gradient_clip_val=outer.gradient_clip_val,
            gradient_clip_algorithm=outer.gradient_clip_algorithm,
            limit_train_batches=outer.limit_train_batches,
            max_steps=num_it,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=outer.default_root_dir,
            callbacks=list(callbacks),
        )


def _sweep_fit(
    outer: pl.Trainer,
    sweep: pl.Trainer,
    module: pl.LightningModule,
    optimizer: torch.optim.Optimizer,
    loader: Any,
) -> None:
    """Train the sweep with ``outer``'s optimizer and loader, then hand the module back to
    ``outer`` where it was (the sweep's teardown moves it and the optimizer to the CPU)."""
    device = outer.strategy.root_device
    # Lightning 2 keeps the module's train/eval mode; the sweep trains, as Learner.lr_find's.
    module.train()
    try:
        with (
            training_with(module, optimizer),
            quiet_lightning(),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", ".*`validation_step` but have no `val_dataloader`")
            sweep.fit(module, train_dataloaders=loader)
    finally:
        module.trainer = outer
        # The optimizer's state follows: range_test's restore loads it onto the params' device.
        module.to(device)
