"""The Learner: fastai's fine-tuning workflow as a facade over a LightningModule and Trainers."""

from __future__ import annotations

import logging
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import nn

from difflr.callbacks import (
    ParamScheduler,
    Recorder,
    layer_group_index,
    momentum_key,
    read_hypers,
)
from difflr.checks import check_epochs, check_moms, check_pct, check_positive, check_wd
from difflr.display import in_notebook
from difflr.distributed import (
    SyncBuffers,
    batches_per_process,
    check_fit_in_process,
    planned_world_size,
)
from difflr.freezing import apply_freeze, check_freeze_to, frozen_pattern, trainable_flags
from difflr.groups import (
    GROUP_INDEX_KEY,
    LayerGroup,
    Splitter,
    build_param_groups,
    split_model,
    warn_single_group,
)
from difflr.loggers import ContinuousLogger
from difflr.lr import LRSpec, expand_lrs
from difflr.lr_finder import SuggestedLRs, valley
from difflr.module import LearnerModule
from difflr.progress import ProgressTable
from difflr.stages import Stage, check_plan

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from difflr.schedules import flat_cos_lr, one_cycle_lr, one_cycle_mom, sched_const

#: Trainer arguments that each fit method sets itself.
_RESERVED = ("max_epochs", "max_steps", "min_epochs", "min_steps")

#: Lightning loggers whose INFO lines ("GPU available: ...", "`Trainer.fit` stopped ...") would
#: repeat at every fit, since each fit has its own Trainer.
_CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")


@dataclass
class Phase:
    """One Trainer's worth of a plan: a frozen pattern, a number of epochs and a scheduler."""

    n_epoch: int
    scheduler: ParamScheduler
    freeze_to: int | None = None
    wd: float | None = None


@dataclass
class SchedulePreview:
    """The schedule a fit would follow, per optimizer step and layer group.

    Attributes:
        lrs: ``(n_steps, n_groups)`` LRs.
        moms: ``(n_steps, n_groups)`` momentums (NaN for optimizers without one).
        names: The layer groups' names.
        boundaries: First step of each Trainer (fit phase or stage).
        trainable: Which groups train in each phase.
    """

    lrs: np.ndarray
    moms: np.ndarray
    names: list[str]
    boundaries: list[int]
    trainable: list[list[bool]]

    def plot_sched(self) -> Figure:
        """Every group's LR and momentum, as ``Recorder.plot_sched`` draws a finished fit."""
        from difflr.plotting import plot_sched

        return plot_sched(self.lrs, self.moms, self.names, self.boundaries[1:])


class PlanState(Callback):
    """Saves, in every checkpoint, which phase of a plan ran and with which frozen pattern."""

    def __init__(self, phase: int, n_phases: int, frozen: Sequence[bool]) -> None:
        self.phase, self.n_phases, self.frozen = phase, n_phases, list(frozen)

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "n_phases": self.n_phases, "frozen": self.frozen}


def _read_plan_state(path: Path, n_phases: int) -> tuple[int, list[bool]]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    states = [v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith("PlanState")]
    if not states:
        raise ValueError(
            f"{path} was not written by a Learner fit (no plan state in it); resume it with "
            "trainer.fit(..., ckpt_path=...) or load weights with learn.load()."
        )
    state = states[0]
    if state["n_phases"] != n_phases:
        raise ValueError(
            f"{path} was written by a call of {state['n_phases']} phase(s) but this call has "
            f"{n_phases}; resume with the same method and arguments that wrote it."
        )
    return int(state["phase"]), list(state["frozen"])


class Learner:
    """Fine-tune a model with layer groups, discriminative LRs, freezing and the one-cycle policy.

    The model and one optimizer (with a param group per layer group, frozen ones included) live
    in the Learner; each fit method builds a fresh Lightning ``Trainer`` and trains for the
    requested epochs. Successive fits log to one continuous TensorBoard timeline.

    Args:
        model: An ``nn.Module`` (then ``loss_func`` is required) or a ``LightningModule`` (its
            ``training_step``/``validation_step`` are used; its ``configure_optimizers`` is
            superseded by the Learner's optimizer).
        data: ``(train_dl, valid_dl)`` (``valid_dl`` may be ``None``), a ``LightningDataModule``,
            or ``None`` when the LightningModule has its own dataloaders.
        loss_func: ``loss_func(preds, target) -> scalar`` for an ``nn.Module``.
        splitter: ``splitter(model)`` returning the layer groups (see `difflr.groups`);
            else ``model.model_splits()``, else a built-in splitter, else one group.
        opt_func: Optimizer factory called as ``opt_func(param_groups, lr=lr)``.
        lr: Default LR spec of the fit methods (float, list per group or ``slice``).
        wd: Weight decay; ``None`` keeps the optimizer's default.
        wd_bn_bias: Also decay biases and normalisation-layer params.
        train_bn: Keep normalisation layers trainable inside frozen groups.
        moms: One-cycle momentum ``(start, middle, end)``, each in [0, 1).
        metrics: Functions ``(preds, targets) -> number`` (or torchmetrics metrics) computed on
            the validation set every epoch (``nn.Module`` models only).
        path: Folder for logs (and checkpoints).
        logger: ``True`` for TensorBoard under ``path``, ``False`` for none, or any Lightning
            logger.
        callbacks: Extra Lightning callbacks given to every Trainer.
        checkpoint: Keep ``path/checkpoints/last.ckpt`` (written at each epoch end) so that an
            interrupted fit can resume with ``ckpt_path="last"``.
        monitor: Also keep ``path/checkpoints/best.ckpt``, the best epoch by this logged metric
            (``"valid_loss"`` is minimised, anything else maximised).
        check_finite: Stop at a NaN or infinite training loss, before that step's update, with
            an error naming the step, the loss and each group's LR (``nn.Module`` models). It
            reads the loss on the host every step; on a GPU pass ``False`` to avoid that sync.
        **trainer_kwargs: Passed to every ``Trainer`` (``accelerator``, ``devices``,
            ``strategy``, ``precision``, ``accumulate_grad_batches``, ...).

    Raises:
        TypeError: ``model``, ``data``, ``opt_func``, ``loss_func`` or ``splitter`` has the wrong
            type.
        ValueError: The splitter misses or repeats parameters; a loader is empty; an argument
            is out of range.

    Examples:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> learn = Learner(model, (DataLoader(ds, batch_size=8), None), F.cross_entropy,
        ...                 splitter=lambda m: [m[0], m[2]], logger=False,
        ...                 enable_progress_bar=False)
        >>> [g.name for g in learn.splits]
        ['0.linear', '1.linear']
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any = None,
        loss_func: Callable[..., torch.Tensor] | None = None,
        *,
        splitter: Splitter | None = None,
        opt_func: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        lr: LRSpec = 1e-3,
        wd: float | None = None,
        wd_bn_bias: bool = False,
        train_bn: bool = True,
        moms: Sequence[float] = (0.95, 0.85, 0.95),
        metrics: Any = None,
        path: str | Path = ".",
        logger: bool | Logger = True,
        callbacks: Sequence[pl.Callback] | None = None,
        checkpoint: bool = True,
        monitor: str | None = None,
        check_finite: bool = True,
        **trainer_kwargs: Any,
    ) -> None:
        self.module, self.model = _make_module(model, loss_func, metrics, lambda: self.opt)
        if isinstance(self.module, LearnerModule):
            self.module.check_finite = bool(check_finite)
        self.train_dl, self.valid_dl, self.datamodule = _check_data(data, self.module)
        reserved = [k for k in _RESERVED if k in trainer_kwargs]
        if reserved:
            raise TypeError(
                f"Learner got Trainer argument(s) {reserved}; the fit methods set the length of "
                "training: pass n_epoch to fit/fit_one_cycle instead."
            )
        if "callbacks" in trainer_kwargs or "logger" in trainer_kwargs:
            raise TypeError("pass callbacks= and logger= as the Learner's own arguments.")
        self.splits: list[LayerGroup] = split_model(model, splitter)
        expand_lrs(lr, len(self.splits), name="lr")
        self.lr = lr
        self.wd = check_wd(wd)
        self.wd_bn_bias = bool(wd_bn_bias)
        self.train_bn = bool(train_bn)
        self.moms = check_moms(moms)
        self.opt = _make_optimizer(
            opt_func, build_param_groups(model, self.splits, wd_bn_bias), lr, len(self.splits)
        )
        self._apply_wd(self.wd)
        self.path = Path(path)
        self.logger = _make_logger(logger, self.path)
        self.callbacks = list(callbacks or [])
        self.checkpoint = bool(checkpoint)
        self.monitor = monitor
        self.trainer_kwargs = trainer_kwargs
        self.recorder = Recorder(log_hypers=self.logger is not None)
        self._table = ProgressTable(self.recorder)
        self.trainer: pl.Trainer | None = None
        self._frozen = [not t for t in trainable_flags(self.splits)]
        self._notified_optimizer = False

    # ----------------------------------------------------------------------------- freezing
    @property
    def n_groups(self) -> int:
        """Number of layer groups."""
        return len(self.splits)

    @property
    def frozen(self) -> list[bool]:
        """For each layer group, whether it is frozen."""
        return list(self._frozen)

    def freeze_to(self, n: int) -> None:
        """Freeze layer groups ``[:n]`` and train the rest (negative ``n`` counts from the end).

        With ``train_bn=True`` normalisation layers stay trainable in frozen groups. A change of
        the frozen pattern clears the optimizer's state (momentum buffers), as in fastai.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: ``n`` is outside ``[-n_groups, n_groups]``.
        """
        check_freeze_to(n, self.n_groups)
        warn_single_group(self.splits, f"freeze_to({n})")
        pattern = frozen_pattern(n, self.n_groups)
        apply_freeze(self.model, self.splits, pattern, self.train_bn)
        if pattern != self._frozen:
            self.opt.state.clear()
        self._frozen = pattern

    def freeze(self) -> None:
        """Train the last layer group (the head) only: ``freeze_to(-1)``."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Train every layer group: ``freeze_to(0)``."""
        self.freeze_to(0)

    # ----------------------------------------------------------------------------- fitting
    # Each fit method validates its arguments, turns them into a plan of phases (a frozen
    # pattern, epochs, a scheduler) and runs it; ``preview_*`` evaluates the same plan's
    # schedulers without training, so a preview and the training cannot disagree.

    def fit(
        self,
        n_epoch: int,
        lr: LRSpec | None = None,
        wd: float | None = None,
        ckpt_path: str | Path | None = None,
    ) -> None:
        """Train ``n_epoch`` epochs at a constant LR per group (momentum left as it is).

        Args:
            n_epoch: Number of epochs (>= 1).
            lr: LR spec; ``None`` uses the Learner's ``lr``.
            wd: Weight decay for this and later fits; ``None`` keeps the current one.
        """
        self._execute(self._plan_fit(n_epoch, lr, wd), ckpt_path)

    def _plan_fit(self, n_epoch: int, lr: LRSpec | None, wd: float | None) -> list[Phase]:
        check_epochs(n_epoch)
        lrs = self._lrs(lr, "lr")
        return [Phase(n_epoch, ParamScheduler(sched_const(np.array(lrs))), wd=check_wd(wd))]

    def fit_one_cycle(
        self,
        n_epoch: int,
        lr_max: LRSpec | None = None,
        div: float = 25.0,
        div_final: float = 1e5,
        pct_start: float = 0.25,
        wd: float | None = None,
        moms: Sequence[float] | None = None,
        ckpt_path: str | Path | None = None,
    ) -> None:
        """Train with the one-cycle policy: per group, LR cosine from ``lr_max/div`` up to
        ``lr_max`` over ``pct_start`` of the steps, then down to ``lr_max/div_final``; momentum
        cosine ``moms[0] -> moms[1] -> moms[2]``.

        Args:
            n_epoch: Number of epochs (>= 1).
            lr_max: Peak LR spec; ``slice(lo, hi)`` spreads it geometrically from the stem to the
                head. ``None`` uses the Learner's ``lr``.
            div: Initial LR is ``lr_max / div`` (> 0).
            div_final: Final LR is ``lr_max / div_final`` (> 0).
            pct_start: Fraction of the steps spent warming up, in (0, 1).
            wd: Weight decay; ``None`` keeps the current one.
            moms: ``(start, middle, end)`` momentum; ``None`` uses the Learner's ``moms``.
            ckpt_path: Resume this fit from a checkpoint written by the same call (a path, or
                ``"last"`` for ``path/checkpoints/last.ckpt``): weights, optimizer state, freeze
                pattern, schedule position and recorder continue where it stopped.

        Examples:
            >>> learn.fit_one_cycle(4, lr_max=slice(1e-5, 1e-3))  # doctest: +SKIP
        """
        self._execute(
            self._plan_one_cycle(n_epoch, lr_max, div, div_final, pct_start, wd, moms), ckpt_path
        )

    def _plan_one_cycle(
        self,
        n_epoch: int,
        lr_max: LRSpec | None = None,
        div: float = 25.0,
        div_final: float = 1e5,
        pct_start: float = 0.25,
        wd: float | None = None,
        moms: Sequence[float] | None = None,
        freeze_to: int | None = None,
        name: str = "lr_max",
    ) -> list[Phase]:
        check_epochs(n_epoch)
        lrs = self._lrs(lr_max, name)
        check_positive(div, "div")
        check_positive(div_final, "div_final")
        check_pct(pct_start)
        moms = self.moms if moms is None else check_moms(moms)
        scheduler = ParamScheduler(
            one_cycle_lr(np.array(lrs), pct_start, div, div_final),
            self._mom_sched(one_cycle_mom(moms, pct_start)),
        )
        return [Phase(n_epoch, scheduler, freeze_to, check_wd(wd))]

    def fit_flat_cos(
        self,
        n_epoch: int,
        lr: LRSpec | None = None,
        div_final: float = 1e5,
        pct_start: float = 0.75,
        wd: float | None = None,
        ckpt_path: str | Path | None = None,
    ) -> None:
        """Train at a flat LR for ``pct_start`` of the steps, then cosine down to
        ``lr/div_final`` (momentum left as it is)."""
        self._execute(self._plan_flat_cos(n_epoch, lr, div_final, pct_start, wd), ckpt_path)

    def _plan_flat_cos(
        self, n_epoch: int, lr: LRSpec | None, div_final: float, pct_start: float, wd: float | None
    ) -> list[Phase]:
        check_epochs(n_epoch)
        lrs = self._lrs(lr, "lr")
        check_positive(div_final, "div_final")
        check_pct(pct_start)
        scheduler = ParamScheduler(flat_cos_lr(np.array(lrs), pct_start, div_final))
        return [Phase(n_epoch, scheduler, wd=check_wd(wd))]

    def fine_tune(
        self,
        epochs: int,
        base_lr: float = 2e-3,
        freeze_epochs: int = 1,
        lr_mult: float = 100,
        pct_start: float = 0.3,
        div: float = 5.0,
        ckpt_path: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        """fastai's transfer-learning recipe: the head alone, then everything with
        discriminative LRs.

        ``freeze(); fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)``, then
        ``unfreeze(); fit_one_cycle(epochs, slice(base_lr/2/lr_mult, base_lr/2),
        pct_start=pct_start, div=div)``. The recorder holds both phases, with a boundary between.

        Args:
            epochs: Epochs of the unfrozen phase (>= 1).
            base_lr: Head LR of the frozen phase (halved for the unfrozen one).
            freeze_epochs: Epochs of the frozen phase (0 skips it).
            lr_mult: Ratio of the head's LR to the stem's in the unfrozen phase (> 0).
            pct_start: Warm-up fraction of the unfrozen phase.
            div: Initial LR divisor of the unfrozen phase.
            **kwargs: Passed to both one-cycles (``div_final``, ``wd``, ``moms``).
        """
        self._execute(
            self._plan_fine_tune(epochs, base_lr, freeze_epochs, lr_mult, pct_start, div, **kwargs),
            ckpt_path,
        )

    def _plan_fine_tune(
        self,
        epochs: int,
        base_lr: float = 2e-3,
        freeze_epochs: int = 1,
        lr_mult: float = 100,
        pct_start: float = 0.3,
        div: float = 5.0,
        **kwargs: Any,
    ) -> list[Phase]:
        check_epochs(epochs)
        if (
            isinstance(freeze_epochs, bool)
            or not isinstance(freeze_epochs, int)
            or freeze_epochs < 0
        ):
            raise ValueError(f"freeze_epochs must be an int >= 0, got {freeze_epochs!r}.")
        check_positive(base_lr, "base_lr")
        check_positive(lr_mult, "lr_mult")
        unknown = set(kwargs) - {"div_final", "wd", "moms"}
        if unknown:
            raise TypeError(
                f"fine_tune got unexpected argument(s) {sorted(unknown)}; it passes div_final, "
                "wd and moms to its one-cycles."
            )
        phases = []
        if freeze_epochs:
            phases += self._plan_one_cycle(
                freeze_epochs,
                slice(base_lr),
                pct_start=0.99,
                freeze_to=-1,
                name="base_lr",
                **kwargs,
            )
        half = base_lr / 2
        phases += self._plan_one_cycle(
            epochs,
            slice(half / lr_mult, half),
            div=div,
            pct_start=pct_start,
            freeze_to=0,
            name="base_lr",
            **kwargs,
        )
        return phases

    def fit_stages(self, stages: Sequence[Stage], ckpt_path: str | Path | None = None) -> None:
        """Run a gradual-unfreezing plan: for each stage, ``freeze_to(stage.freeze_to)`` and a
        one-cycle over ``stage.epochs`` with the stage's peak LRs (a fresh Trainer per stage).

        The recorder and TensorBoard show the whole plan as one timeline, with every group's LR,
        momentum and trainable state, and a boundary at each stage.

        Args:
            stages: A list of ``Stage``, e.g. ``Stage.from_milestones(milestones)``.
            ckpt_path: Resume the same plan from a checkpoint (a path, or ``"last"``).

        Raises:
            ValueError: A stage does not fit the model (``freeze_to`` out of range, ``lr_max``
                of the wrong length); nothing has run then.

        Examples:
            >>> learn.fit_stages(Stage.from_milestones(milestones))  # doctest: +SKIP
        """
        self._execute(self._plan_stages(stages), ckpt_path)

    def _plan_stages(self, stages: Sequence[Stage]) -> list[Phase]:
        stages = check_plan(stages, self.n_groups)
        return [
            Phase(
                stage.epochs,
                ParamScheduler(
                    stage.lr_schedule(self.n_groups), self._mom_sched(stage.mom_schedule(self.moms))
                ),
                stage.freeze_to,
                stage.wd,
            )
            for stage in stages
        ]

    # ----------------------------------------------------------------------------- previews
    def preview_one_cycle(
        self, n_epoch: int, lr_max: LRSpec | None = None, **kwargs: Any
    ) -> SchedulePreview:
        """The per-step, per-group LRs and momentums ``fit_one_cycle`` would use, without
        training (same arguments)."""
        return self._preview(self._plan_one_cycle(n_epoch, lr_max, **kwargs))

    def preview_fine_tune(self, epochs: int, **kwargs: Any) -> SchedulePreview:
        """The schedule ``fine_tune`` would use (both phases), without training."""
        return self._preview(self._plan_fine_tune(epochs, **kwargs))

    def preview_stages(self, stages: Sequence[Stage]) -> SchedulePreview:
        """The schedule ``fit_stages`` would use, stage by stage, without training."""
        return self._preview(self._plan_stages(stages))

    def _preview(self, phases: list[Phase]) -> SchedulePreview:
        steps_per_epoch = self._steps_per_epoch()
        index = layer_group_index(self.opt)
        lrs, moms, boundaries, trainable = [], [], [], []
        for phase in phases:
            boundaries.append(sum(len(x) for x in lrs))
            pattern = (
                self._frozen
                if phase.freeze_to is None
                else frozen_pattern(phase.freeze_to, self.n_groups)
            )
            trainable.append([not f for f in pattern])
            phase_lrs, phase_moms = phase.scheduler.schedule(phase.n_epoch * steps_per_epoch, index)
            if phase_moms is None:
                phase_moms = np.tile(read_hypers(self.opt)[1], (len(phase_lrs), 1))
            lrs.append(phase_lrs)
            moms.append(phase_moms)
        names = [g.name for g in self.splits]
        return SchedulePreview(
            np.concatenate(lrs), np.concatenate(moms), names, boundaries, trainable
        )

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch in one process, as the Trainer will count them."""
        loader = self.train_dl
        if loader is None:
            source = self.datamodule if self.datamodule is not None else self.module
            loader = source.train_dataloader()
        if _length(loader) is None:
            raise ValueError(
                "cannot preview: the training data has no length; preview needs len(train_dl)."
            )
        # Under a distributed strategy each process trains on its shard of the data.
        with _quiet_lightning():
            world_size = planned_world_size(self.trainer_kwargs)
        n = batches_per_process(
            loader, world_size, self.trainer_kwargs.get("use_distributed_sampler", True)
        )
        limit = self.trainer_kwargs.get("limit_train_batches")
        if isinstance(limit, int) and not isinstance(limit, bool):
            n = min(n, limit)
        elif isinstance(limit, float):
            n = int(n * limit)
        return max(1, math.ceil(n / self.trainer_kwargs.get("accumulate_grad_batches", 1)))

    # ----------------------------------------------------------------------------- running
    def _execute(self, phases: list[Phase], ckpt_path: str | Path | None = None) -> None:
        """Run a validated plan: a fresh Trainer per phase, one record for all of them.

        With ``ckpt_path`` the phases the checkpoint's run had finished are skipped and the
        phase it was in resumes from it (weights, optimizer state, freeze pattern, schedule
        position, recorder, epoch)."""
        first, resume = 0, None
        if ckpt_path is not None:
            resume = self._resolve_ckpt(ckpt_path)
            first, pattern = _read_plan_state(resume, len(phases))
        self.recorder.reset()
        self._table.start()
        for k in range(first, len(phases)):
            phase = phases[k]
            if k == first and resume is not None:
                self._set_frozen(pattern)
            elif phase.freeze_to is not None:
                self.freeze_to(phase.freeze_to)
            self._apply_wd(phase.wd)
            marker = PlanState(k, len(phases), self._frozen)
            trainer = self._make_trainer([phase.scheduler, marker], max_epochs=phase.n_epoch)
            self.trainer = trainer
            self._run(
                trainer, phase.scheduler, ckpt_path=str(resume) if k == first and resume else None
            )

    def _resolve_ckpt(self, ckpt_path: str | Path) -> Path:
        path = self.path / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path={str(ckpt_path)!r}: no checkpoint at {path}; pass the path of a .ckpt "
                "file, or 'last' for the Learner's path/checkpoints/last.ckpt."
            )
        return path

    def _set_frozen(self, pattern: Sequence[bool]) -> None:
        apply_freeze(self.model, self.splits, list(pattern), self.train_bn)
        self._frozen = list(pattern)

    def _lrs(self, spec: LRSpec | None, name: str) -> list[float]:
        return expand_lrs(self.lr if spec is None else spec, self.n_groups, name=name)

    def _mom_sched(self, sched: Callable[[float], Any]) -> Callable[[float], Any] | None:
        return sched if momentum_key(self.opt) is not None else None

    def _apply_wd(self, wd: float | None) -> None:
        """Set weight decay on the decayed param groups; the no-decay ones stay at 0."""
        for pg in self.opt.param_groups:
            if pg.get("no_decay"):
                if "weight_decay" in pg:
                    pg["weight_decay"] = 0.0
            elif wd is not None:
                pg["weight_decay"] = wd
        if wd is not None:
            self.wd = wd

    def _make_trainer(
        self,
        callbacks: Sequence[pl.Callback],
        standard_callbacks: bool = True,
        **overrides: Any,
    ) -> pl.Trainer:
        """A fresh Trainer with the Learner's arguments; ``standard_callbacks`` adds the
        recorder, the epoch table and the user's callbacks after ``callbacks``."""
        kwargs: dict[str, Any] = {
            "logger": self.logger if self.logger is not None else False,
            "default_root_dir": str(self.path),
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        }
        if in_notebook():
            # Lightning's text bar would print a line per refresh in a notebook; the epoch table
            # updates in place instead (pass enable_progress_bar=True to have both).
            kwargs["enable_progress_bar"] = False
        n_batches = _length(self.train_dl)
        if n_batches:
            kwargs["log_every_n_steps"] = max(1, min(50, n_batches))
        kwargs.update(self.trainer_kwargs)
        kwargs.update(overrides)
        standard = [self.recorder, self._table, *self.callbacks] if standard_callbacks else []
        if standard_callbacks and self.checkpoint:
            standard += self._checkpoint_callbacks()
            kwargs["enable_checkpointing"] = True
        # SyncBuffers: every DDP rank ends the fit with rank 0's BatchNorm statistics.
        kwargs["callbacks"] = [SyncBuffers(), *callbacks, *standard]
        if not standard_callbacks:
            kwargs["callbacks"].append(self.recorder)
        with _quiet_lightning():
            trainer = pl.Trainer(**kwargs)
        check_fit_in_process(trainer)
        return trainer

    def _checkpoint_callbacks(self) -> list[pl.Callback]:
        folder = self.path / "checkpoints"
        callbacks: list[pl.Callback] = [
            # One file, overwritten at each epoch end (save_last alone only writes at fit end).
            ModelCheckpoint(
                dirpath=folder, filename="last", save_top_k=1, enable_version_counter=False
            )
        ]
        if self.monitor is not None:
            mode = "min" if "loss" in self.monitor else "max"
            callbacks.append(
                ModelCheckpoint(
                    dirpath=folder,
                    filename="best",
                    monitor=self.monitor,
                    mode=mode,
                    save_top_k=1,
                    enable_version_counter=False,
                )
            )
        return callbacks

    def _data_kwargs(self) -> dict[str, Any]:
        if self.datamodule is not None:
            return {"datamodule": self.datamodule}
        if self.train_dl is not None:
            return {"train_dataloaders": self.train_dl, "val_dataloaders": self.valid_dl}
        return {}

    def _run(
        self, trainer: pl.Trainer, scheduler: ParamScheduler, log: bool = True, **fit_kwargs: Any
    ) -> None:
        """``trainer.fit`` with the Learner's optimizer, quiet logs and a clean interrupt.

        ``log=False`` keeps the run off the TensorBoard timeline (``lr_find``)."""
        handler = signal.getsignal(signal.SIGINT)
        # Lightning 2 keeps the module's train/eval mode; a fit trains (as fastai's does).
        self.module.train()
        try:
            with _quiet_lightning(), self._supersede_optimizer(), warnings.catch_warnings():
                # LearnerModule always defines validation_step; no valid_dl is not a mistake.
                warnings.filterwarnings(
                    "ignore", ".*`validation_step` but have no `val_dataloader`"
                )
                # Raised inside Lightning itself on recent torch; nothing a user can act on.
                warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)")
                # Every fit writes path/checkpoints/last.ckpt anew, by design.
                warnings.filterwarnings(
                    "ignore", r"Checkpoint directory .* exists and is not empty"
                )
                trainer.fit(self.module, **self._data_kwargs(), **fit_kwargs)
        except SystemExit:
            # Lightning turns Ctrl-C into SystemExit (it would end a notebook's kernel or a
            # script's later cleanup); give the user back the KeyboardInterrupt they raised.
            if trainer.interrupted:
                raise KeyboardInterrupt(
                    f"fit interrupted after {scheduler.step} optimizer steps; the Learner keeps "
                    "the weights and the recorder keeps the steps done."
                ) from None
            raise
        finally:
            # Lightning ignores SIGINT while it shuts down after an interrupt; restore it.
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, handler)
            if log and isinstance(self.logger, ContinuousLogger):
                self.logger.step_offset += scheduler.step
                self.logger.epoch_offset += trainer.current_epoch

    @contextmanager
    def _supersede_optimizer(self) -> Iterator[None]:
        """Make a user's LightningModule train with the Learner's optimizer.

        The module's own ``configure_optimizers`` is shadowed by an instance attribute for the
        length of one fit and restored afterwards (the class is never touched).
        """
        if isinstance(self.module, LearnerModule):
            yield
            return
        if not self._notified_optimizer:
            warnings.warn(
                f"{type(self.module).__name__}.configure_optimizers is superseded by the "
                f"Learner's {type(self.opt).__name__} with one param group per layer group; "
                "pass opt_func= to the Learner to choose the optimizer.",
                stacklevel=4,
            )
            self._notified_optimizer = True
        module = self.module
        own = module.__dict__.get("configure_optimizers")
        module.configure_optimizers = lambda: self.opt
        try:
            yield
        finally:
            if own is None:
                del module.configure_optimizers
            else:
                module.configure_optimizers = own

    # ----------------------------------------------------------------------------- lr_find
    def lr_find(
        self,
        start_lr: LRSpec = 1e-7,
        end_lr: LRSpec = 10.0,
        num_it: int = 100,
        stop_div: bool = True,
        show_plot: bool = True,
        suggest_funcs: Any = (valley,),
        snapshot: str = "memory",
    ) -> SuggestedLRs:
        """The LR range test: train ``num_it`` steps with an exponentially growing LR, suggest an
        LR from the loss curve, and leave the Learner exactly as it was.

        The LR of step ``i`` is ``start * (end / start) ** (i / num_it)`` for every layer group,
        so bounds given as lists or slices keep the ratios between groups (frozen groups do not
        move). Weights, buffers, optimizer state and hyper-parameters, ``requires_grad`` flags,
        train/eval modes and the torch/numpy/python RNG states are restored bit for bit
        afterwards, also when the sweep diverges, raises or is interrupted. Nothing is logged or
        written to disk (unless ``snapshot="disk"``).

        Args:
            start_lr: First LR: a float, a list per group or a slice (see ``expand_lrs``).
            end_lr: LR that the sweep would reach at step ``num_it``; above ``start_lr``.
            num_it: Number of steps (>= 2); the training loader is repeated as needed.
            stop_div: Stop once the smoothed loss exceeds 4x the best or is not finite.
            show_plot: Show the loss-vs-LR figure inline (in Jupyter; nothing in a script).
            suggest_funcs: Functions ``(lrs, losses) -> lr`` applied to the curve without its
                first ``num_it // 10`` and last 5 points, on the head group's LR.
            snapshot: ``"memory"`` (fast) or ``"disk"`` (a file under ``path``, removed after;
                for a model too large to hold twice).

        Returns:
            A ``SuggestedLRs`` namedtuple, one field per suggestion function (``res.valley``).
            ``learn.recorder`` holds the sweep (``lrs``, ``losses``, ``plot_lr_find()``).

        Raises:
            ValueError: ``start_lr >= end_lr`` for a group, a non-positive bound, ``num_it < 2``.
        """
        from difflr.lr_finder import lr_find

        return lr_find(self, start_lr, end_lr, num_it, stop_div, show_plot, suggest_funcs, snapshot)

    # ----------------------------------------------------------------------------- persistence
    def save(self, name: str, with_opt: bool = True) -> Path:
        """Save the model's weights (and the optimizer state and freeze pattern) to
        ``path/models/{name}.pth``; returns the file's path."""
        file = self.path / "models" / f"{name}.pth"
        file.parent.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {"model": self.model.state_dict(), "frozen": self._frozen}
        if with_opt:
            state["opt"] = self.opt.state_dict()
        torch.save(state, file)
        return file

    def load(self, name: str | Path, with_opt: bool = True, strict: bool = True) -> Learner:
        """Load what `save` wrote (a name under ``path/models`` or a file path).

        Raises:
            FileNotFoundError: No such file.
            ValueError: The file's optimizer state does not match this Learner's groups.
        """
        file = Path(name) if Path(name).suffix else self.path / "models" / f"{name}.pth"
        if not file.is_file():
            raise FileNotFoundError(f"no saved Learner state at {file}; see Learner.save(name).")
        state = torch.load(file, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"], strict=strict)
        if len(state.get("frozen", ())) == self.n_groups:
            self._set_frozen(state["frozen"])
        if with_opt and "opt" in state:
            self.opt.load_state_dict(state["opt"])
        return self

    def export(self, fname: str = "export.pt") -> Path:
        """Write the model (architecture and weights, in eval mode) for inference to
        ``path/fname``; read it back with ``torch.load(file, weights_only=False)``."""
        file = self.path / fname
        file.parent.mkdir(parents=True, exist_ok=True)
        training = self.model.training
        self.model.eval()
        try:
            torch.save(self.model, file)
        finally:
            self.model.train(training)
        return file

    # ----------------------------------------------------------------------------- inspection
    def summary(self) -> str:
        """A table of the layer groups: name, parameter count, trainable state and current LR."""
        lrs, _ = read_hypers(self.opt)
        rows = [("group", "params", "trainable", "lr")]
        for group, frozen, lr in zip(self.splits, self._frozen, lrs):
            trainable = sum(p.numel() for p in group.params if p.requires_grad)
            state = (
                "no" if trainable == 0 else ("yes" if not frozen else f"norm only ({trainable:,})")
            )
            rows.append((group.name, f"{group.n_params:,}", state, f"{lr:.2e}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)

    def __repr__(self) -> str:
        return (
            f"Learner({type(self.model).__name__}, {self.n_groups} layer groups, "
            f"opt={type(self.opt).__name__}, frozen={sum(self._frozen)}/{self.n_groups})"
        )


# --------------------------------------------------------------------------------- validation
def _make_module(
    model: Any, loss_func: Any, metrics: Any, optimizer: Callable[[], torch.optim.Optimizer]
) -> tuple[pl.LightningModule, nn.Module]:
    if isinstance(model, pl.LightningModule):
        if loss_func is not None or metrics:
            warnings.warn(
                "loss_func and metrics are ignored for a LightningModule: its training_step and "
                "validation_step compute and log them.",
                stacklevel=3,
            )
        return model, model
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module or a LightningModule, got {type(model).__name__}."
        )
    if loss_func is None:
        raise TypeError(
            f"a plain nn.Module ({type(model).__name__}) needs a loss_func, e.g. "
            "Learner(model, data, loss_func=F.cross_entropy); or pass a LightningModule."
        )
    if not callable(loss_func):
        raise TypeError(f"loss_func must be callable (preds, target) -> loss, got {loss_func!r}.")
    if metrics is None:
        metrics = []
    elif callable(metrics) or isinstance(metrics, nn.Module):  # one metric, not a list
        metrics = [metrics]
    metrics = list(metrics)
    for m in metrics:
        if not callable(m) and not hasattr(m, "compute"):
            raise TypeError(f"metric {m!r} is not callable (preds, targets) -> number.")
    return LearnerModule(model, loss_func, metrics, optimizer), model


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _check_loader(loader: Any, name: str) -> None:
    if isinstance(loader, (str, bytes, torch.Tensor, np.ndarray)) or not hasattr(
        loader, "__iter__"
    ):
        raise TypeError(
            f"{name} must be a DataLoader (or an iterable of batches), got "
            f"{type(loader).__name__}; wrap a Dataset in torch.utils.data.DataLoader."
        )
    if _length(loader) == 0:
        raise ValueError(
            f"{name} is empty (0 batches); check the dataset's size, batch_size and drop_last."
        )


def _check_data(data: Any, module: pl.LightningModule) -> tuple[Any, Any, Any]:
    if isinstance(data, pl.LightningDataModule):
        return None, None, data
    if data is None:
        if isinstance(module, LearnerModule):
            raise TypeError(
                "data is None, but a plain nn.Module has no dataloaders; pass "
                "(train_dl, valid_dl) or a LightningDataModule."
            )
        return None, None, None
    if isinstance(data, (tuple, list)) and len(data) in (1, 2):
        train_dl, valid_dl = (data[0], None) if len(data) == 1 else data
        _check_loader(train_dl, "the training loader (data[0])")
        if valid_dl is not None:
            _check_loader(valid_dl, "the validation loader (data[1])")
        return train_dl, valid_dl, None
    if isinstance(data, torch.utils.data.DataLoader):
        _check_loader(data, "data")
        return data, None, None
    raise TypeError(
        f"data must be (train_dl, valid_dl), a LightningDataModule or None; got "
        f"{type(data).__name__}"
        + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
        + "."
    )


def _make_optimizer(
    opt_func: Any, param_groups: list[dict[str, Any]], lr: LRSpec, n_groups: int
) -> torch.optim.Optimizer:
    if not callable(opt_func) or isinstance(opt_func, torch.optim.Optimizer):
        raise TypeError(
            f"opt_func must be an optimizer factory such as torch.optim.AdamW or "
            f"functools.partial(torch.optim.SGD, momentum=0.9), got {opt_func!r}."
        )
    lrs = expand_lrs(lr, n_groups, name="lr")
    for pg in param_groups:
        pg["lr"] = lrs[pg[GROUP_INDEX_KEY]]
    try:
        opt = opt_func(param_groups, lr=lrs[-1])
    except TypeError as exc:
        raise TypeError(
            f"opt_func {opt_func!r} could not be called as opt_func(param_groups, lr=...): "
            f"{exc}. Pass a torch optimizer class or a functools.partial of one."
        ) from exc
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"opt_func returned a {type(opt).__name__}, not a torch.optim.Optimizer; pass an "
            "optimizer class such as torch.optim.AdamW."
        )
    return opt


def _make_logger(logger: bool | Logger, path: Path) -> ContinuousLogger | None:
    if logger is True:
        return ContinuousLogger(TensorBoardLogger(save_dir=str(path), name="lightning_logs"))
    if logger is False or logger is None:
        return None
    if isinstance(logger, Logger):
        return ContinuousLogger(logger)
    raise TypeError(f"logger must be True, False or a Lightning Logger, got {logger!r}.")


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's INFO lines that every fresh Trainer would print again."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
