"""The recorder: every optimizer step's LRs, momentums and smoothed loss, and every epoch's row.

It works on any ``Trainer`` whose (single) optimizer has one or more torch param groups per
layer group, each carrying the layer group's index under ``"layer_group"`` (as
`difflr.optim.param_groups.build_param_groups` makes them). An optimizer without that key is
treated as one layer group per param group, so the recorder also drops into a hand-written
module. The loss of a step is read by `difflr.callbacks.step_loss.StepLosses`."""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from difflr.callbacks.scheduler import single_optimizer
from difflr.callbacks.step_loss import SmoothedLoss, StepLosses
from difflr.optim.param_groups import (
    layer_group_index,
    layer_group_names,
    momentum_key,
    read_hypers,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["HYPER_POINTS_PER_FIT", "Recorder"]

#: About this many LR/momentum points per fit reach the logger: enough to draw a one-cycle,
#: at a bounded cost (a TensorBoard write of 12 scalars costs ~0.4 ms on CPU).
HYPER_POINTS_PER_FIT = 200


class Recorder(Callback):
    """Record, for every optimizer step, each layer group's LR and momentum and the smoothed loss;
    and, for every epoch, the train loss, the validation loss and the metrics.

    Per-step losses stay on the device and are read once per epoch, so recording adds no device
    synchronisation to a step. A Learner keeps one Recorder; `reset` starts a new record
    (each public fit call does), and every Trainer in it adds a boundary (fits of ``fine_tune``,
    stages of ``fit_stages``).

    Attributes:
        lrs: ``(n_steps, n_groups)`` LRs used at each optimizer step.
        moms: ``(n_steps, n_groups)`` momentums (NaN for optimizers without one).
        losses: ``(n_steps,)`` smoothed training loss after each step.
        values: One dict per epoch: ``epoch``, ``train_loss``, ``valid_loss``, metrics, ``time``.
        names: The layer groups' names.
        boundaries: Step indices where each Trainer of the record started.
        trainable: For each boundary, which layer groups trained.
        lr_finds: ``{stage: {"lrs", "losses", "suggestion", "points"}}``: the range test of
            each stage of a plan whose LR is found at its start (``Stage(lr_max="valley")``):
            its ``(n_iter, n_groups)`` LRs, smoothed losses, the LR chosen (the head group's)
            and the points `plot_lr_find` marks. See `stage_lrs`.
    """

    def __init__(self, log_hypers: bool = True) -> None:
        self.log_hypers = log_hypers
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded."""
        self._lrs: list[np.ndarray] = []
        self._moms: list[np.ndarray] = []
        self._losses: list[float] = []
        self.values: list[dict[str, float]] = []
        self.names: list[str] = []
        self.boundaries: list[int] = []
        self.trainable: list[list[bool]] = []
        self.epoch_offset = 0
        self._epoch_steps: list[int] = []
        self.lr_find_points: dict[str, tuple[float, float]] = {}
        self.lr_finds: dict[int, dict[str, Any]] = {}
        self._resumed = False
        self._index: list[int] = []
        self._key: str | None = None
        self._begin_run()

    def _begin_run(self, losses: StepLosses | None = None) -> None:
        # This run's step losses, read once per epoch (``losses``: a resumed run's, continued).
        self._step_losses = StepLosses() if losses is None else losses
        self._log_every = 1
        self._epoch_start = time.perf_counter()

    @property
    def lrs(self) -> np.ndarray:
        if not self._lrs:
            return np.empty((0, len(self.names)))
        return np.array(self._lrs)

    @property
    def moms(self) -> np.ndarray:
        if not self._moms:
            return np.empty((0, len(self.names)))
        return np.array(self._moms)

    @property
    def losses(self) -> np.ndarray:
        return np.array(self._losses)

    @property
    def stage_lrs(self) -> dict[int, float]:
        """``{stage: lr}``: the LR found at the start of each stage that finds its own (the head
        group's; ``Learner.preview_stages(plan, found_lrs=recorder.stage_lrs)`` shows the
        schedule the plan followed)."""
        return {k: sweep["suggestion"] for k, sweep in sorted(self.lr_finds.items())}

    def add_stage_lr_find(self, stage: int, suggestion: float) -> None:
        """Keep the range test just recorded (`lrs`, `losses`, `lr_find_points`: what
        ``lr_find`` leaves) as the one of ``stage``, with the LR chosen; call it inside
        `set_aside`, which then puts the plan's record back around it."""
        self.lr_finds[stage] = {
            "lrs": self.lrs,
            "losses": self.losses,
            "suggestion": float(suggestion),
            "points": dict(self.lr_find_points),
        }

    @contextmanager
    def set_aside(self) -> Iterator[None]:
        """Keep the record through a run that starts its own (a stage's range test resets the
        recorder): everything recorded before it is back afterwards, with what the run added to
        `lr_finds`."""
        saved = dict(self.__dict__)
        try:
            yield
        finally:
            lr_finds = {**saved["lr_finds"], **self.lr_finds}
            self.__dict__.clear()
            self.__dict__.update(saved, lr_finds=lr_finds)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_losses()
        optimizer = single_optimizer(trainer)
        self.names = layer_group_names(optimizer)
        resumed, self._resumed = getattr(self, "_resumed", False), False
        index = self._index = layer_group_index(optimizer)
        self._key = momentum_key(optimizer)
        flags = [False] * len(self.names)
        for i, pg in zip(index, optimizer.param_groups):
            flags[i] = flags[i] or any(p.requires_grad for p in pg["params"])
        total = trainer.estimated_stepping_batches
        log_every = (
            max(1, int(total) // HYPER_POINTS_PER_FIT)
            if math.isfinite(total)
            else trainer.log_every_n_steps
        )
        if resumed:  # keep the interrupted run's boundary and its smoothed-loss average
            self._begin_run(StepLosses(self._step_losses.ema, self._step_losses.last))
            self._log_every = log_every
            return
        self.boundaries.append(len(self._lrs))
        self.trainable.append(flags)
        self._begin_run()
        self._log_every = log_every
        if self.log_hypers:
            _log(trainer, {f"trainable/{n}": float(f) for n, f in zip(self.names, flags)}, 0)
            _write_layout(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        lrs, moms = read_hypers(optimizer, self._index, self._key)
        self._lrs.append(lrs)
        self._moms.append(moms)
        self._step_losses.step()
        if self.log_hypers and trainer.global_step % self._log_every == 0:
            metrics = {f"lr/{n}": v for n, v in zip(self.names, lrs)}
            if not np.isnan(moms).all():
                metrics.update({f"mom/{n}": v for n, v in zip(self.names, moms)})
            _log(trainer, metrics, trainer.global_step)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._step_losses.batch_end(outputs, trainer.accumulate_grad_batches)

    def _flush_losses(self) -> None:
        """Turn the per-batch losses since the last flush into smoothed per-step losses (one
        device read). A step none of whose batches returned a loss (a ``training_step`` that
        returned ``None``: Lightning's way to skip a batch) gets NaN and leaves the average
        alone."""
        self._losses.extend(math.nan if v is None else v for v in self._step_losses.read())

    def epoch_row(self, trainer: pl.Trainer) -> dict[str, float]:
        """The row the epoch ending now gets in `values` (``time`` aside): ``epoch``, the smoothed
        ``train_loss``, then what the epoch logged (``valid_loss``, metrics). Callbacks that act
        at an epoch's end (a plateau-driven stage) read the values from here, before the row is
        added."""
        self._flush_losses()
        row = {
            "epoch": float(self.epoch_offset + trainer.current_epoch),
            "train_loss": self._step_losses.last,
        }
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train"):
                continue
            row[key] = float(value) if isinstance(value, (torch.Tensor, float, int)) else math.nan
        return row

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = self.epoch_row(trainer)
        row["time"] = time.perf_counter() - self._epoch_start
        self.values.append(row)
        self._epoch_steps.append(len(self._lrs) - 1)

    # ----------------------------------------------------------------------------- checkpoints
    _STATE = (
        "_lrs",
        "_moms",
        "_losses",
        "values",
        "names",
        "boundaries",
        "trainable",
        "epoch_offset",
        "_epoch_steps",
    )

    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush_losses()
        # Plain python values only: Lightning loads checkpoints with weights_only=True.
        state = {key: getattr(self, key) for key in self._STATE}
        state["_lrs"] = [row.tolist() for row in self._lrs]
        state["_moms"] = [row.tolist() for row in self._moms]
        # The smoothed-loss average, so that a resumed run continues the same curve.
        losses = self._step_losses
        state.update(_avg=float(losses.ema.avg), _count=losses.ema.count, _last_loss=losses.last)
        state["lr_finds"] = {
            k: {
                "lrs": sweep["lrs"].tolist(),
                "losses": sweep["losses"].tolist(),
                "suggestion": sweep["suggestion"],
                "points": {name: list(point) for name, point in sweep["points"].items()},
            }
            for k, sweep in self.lr_finds.items()
        }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in self._STATE:
            setattr(self, key, state_dict[key])
        self._lrs = [np.array(row) for row in self._lrs]
        self._moms = [np.array(row) for row in self._moms]
        ema = SmoothedLoss(avg=state_dict["_avg"], count=state_dict["_count"])
        self._step_losses = StepLosses(ema, state_dict["_last_loss"])
        self.lr_finds = {  # absent before stages found their LR
            int(k): {
                "lrs": np.array(sweep["lrs"]),
                "losses": np.array(sweep["losses"]),
                "suggestion": float(sweep["suggestion"]),
                "points": {name: tuple(point) for name, point in sweep["points"].items()},
            }
            for k, sweep in state_dict.get("lr_finds", {}).items()
        }
        self._resumed = True  # the next on_train_start continues this run, not a new one

    # ----------------------------------------------------------------------------- workers
    def handback_state(self) -> dict[str, Any]:
        """What a worker process (``ddp_notebook``) hands back: the whole record so far."""
        return self.state_dict()

    def load_handback_state(self, state: dict[str, Any]) -> None:
        """Take a worker's record as this one; the next fit starts a new run, as it would
        after a call in this process (unlike a checkpoint's, which the next fit continues)."""
        self.load_state_dict(state)
        self._resumed = False

    # ----------------------------------------------------------------------------- plots
    def plot_sched(self) -> Figure:
        """Every layer group's LR (log scale) and momentum at each step, fits marked."""
        from difflr.plotting import plot_sched

        return plot_sched(self.lrs, self.moms, self.names, self.boundaries[1:], self.trainable)

    def plot_loss(self, skip_start: int = 0) -> Figure:
        """The smoothed training loss per step and the validation loss per epoch."""
        from difflr.plotting import plot_loss

        valid = [
            (step, row["valid_loss"])
            for step, row in zip(self._epoch_steps, self.values)
            if "valid_loss" in row and math.isfinite(row["valid_loss"])
        ]
        return plot_loss(self.losses, valid, skip_start)

    def plot_lr_find(self, skip_end: int = 5, stage: int | None = None) -> Figure:
        """The last ``lr_find``'s loss against the head group's LR, suggestions marked; with
        ``stage``, the range test that found that stage's LR (see `lr_finds`).

        Raises:
            ValueError: Nothing recorded yet, or no range test for ``stage`` (the stages that
                found their LR are named).
        """
        from difflr.plotting import plot_lr_find

        if stage is not None:
            if stage not in self.lr_finds:
                raise ValueError(
                    f"no range test recorded for stage {stage!r}; the stages that found their LR "
                    f"in the last fit are {sorted(self.lr_finds)} (Stage(lr_max='valley'))."
                )
            sweep = self.lr_finds[stage]
            lrs, losses, points = sweep["lrs"][:, -1], sweep["losses"], sweep["points"]
        else:
            if not self.lr_find_points and not len(self._lrs):
                raise ValueError("nothing recorded yet; run learn.lr_find() first.")
            lrs, losses, points = self.lrs[:, -1], self.losses, self.lr_find_points
        n = min(len(lrs), len(losses))
        return plot_lr_find(lrs[:n], losses[:n], points, min(skip_end, n - 1))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_losses()
        self.epoch_offset += trainer.current_epoch

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._flush_losses()  # keep the steps done before an interrupt or an error


#: TensorBoard's custom-scalars layout: every layer group's LR on one chart, and momentum on
#: another, as a user would arrange them (the plain scalars tab draws one chart per tag, where a
#: stem at 1e-5 beside a head at 1e-3 looks like 0). Tags are regular expressions.
TENSORBOARD_LAYOUT = {
    "difflr": {
        "lr, every layer group": ["Multiline", [r"lr/.*"]],
        "momentum, every layer group": ["Multiline", [r"mom/.*"]],
    }
}


_LAID_OUT: weakref.WeakSet[Any] = weakref.WeakSet()  # the writers that have the layout


def _write_layout(trainer: pl.Trainer) -> None:
    """Give every TensorBoard writer of the Trainer the layout, once per writer (a Learner's
    calls share one)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        add_layout = getattr(experiment, "add_custom_scalars", None)
        if callable(add_layout) and experiment not in _LAID_OUT:
            add_layout(TENSORBOARD_LAYOUT)
            _LAID_OUT.add(experiment)


def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step)
