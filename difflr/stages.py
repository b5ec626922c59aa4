"""Stage plans: gradual unfreezing with a fresh one-cycle per stage.

A `Stage` is one frozen pattern trained with one one-cycle over some epochs. A list of
stages is a plan: ``Learner.fit_stages(stages)`` runs it with a fresh Trainer per stage (the
frozen pattern is set before each Trainer sets up, so a DDP wrapper sees exactly the params that
train), and `GradualUnfreezing` runs the same plan inside one ``trainer.fit`` of a user's
own ``LightningModule`` and ``Trainer``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from difflr.callbacks import ParamScheduler
from difflr.checks import check_moms, check_number
from difflr.freezing import apply_freeze, check_freeze_to, frozen_pattern
from difflr.groups import GROUP_INDEX_KEY, LayerGroup, Splitter, build_param_groups, split_model
from difflr.lr import LRSpec, expand_lrs
from difflr.schedules import Schedule, one_cycle_lr, one_cycle_mom

_MILESTONE_KEYS = {"freeze_to", "duration", "lrs"}
_MILESTONE_OPTIONAL = {
    "pct_start",
    "div_factor",
    "final_div_factor",
    "base_momentum",
    "max_momentum",
}


@dataclass(frozen=True)
class Stage:
    """One stage of a plan: freeze ``freeze_to`` groups, then one one-cycle over ``epochs``.

    Args:
        freeze_to: Groups ``[:freeze_to]`` are frozen (negative counts from the end; 0 trains all).
        epochs: Number of epochs (>= 1).
        lr_max: Peak LR spec: a float, a ``slice`` or one value per group. Zeros are allowed in a
            list (the original milestone plans give frozen groups 0): such groups do not move.
        pct_start: Warm-up fraction in (0, 1).
        div: Initial LR is ``lr_max / div``.
        div_final: Final LR is ``lr_max / div_final``.
        moms: ``(start, middle, end)`` momentum; ``None`` uses the Learner's.
        wd: Weight decay for the stage; ``None`` keeps the current one.
        name: A label used in error messages (``from_milestones`` sets ``"milestones[3]"``).

    Examples:
        >>> plan = [Stage(-1, 1, 1e-3), Stage(0, 2, slice(1e-5, 1e-3), pct_start=0.3)]
        >>> plan[1].lrs(3)
        [1e-05, 0.0001, 0.001]
    """

    freeze_to: int
    epochs: int
    lr_max: LRSpec
    pct_start: float = 0.25
    div: float = 25.0
    div_final: float = 1e5
    moms: tuple[float, float, float] | None = None
    wd: float | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        label = self.name or "Stage"
        if isinstance(self.freeze_to, bool) or not isinstance(self.freeze_to, int):
            raise TypeError(f"{label}: freeze_to must be an int, got {self.freeze_to!r}.")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"{label}: epochs must be an int >= 1, got {self.epochs!r}.")
        check_number(self.pct_start, f"{label}: pct_start", 0, 1)
        check_number(self.div, f"{label}: div", 0)
        check_number(self.div_final, f"{label}: div_final", 0)
        if self.moms is not None:
            object.__setattr__(self, "moms", check_moms(self.moms, f"{label}: moms"))
        if self.wd is not None:
            check_number(self.wd, f"{label}: wd", 0, open_low=False)

    def lrs(self, n_groups: int) -> list[float]:
        """The stage's peak LR per group."""
        name = f"{self.name}['lrs']" if self.name else "lr_max"
        lrs = expand_lrs(self.lr_max, n_groups, name=name, allow_zero=True)
        if not any(lrs):
            raise ValueError(f"{name} is all zeros: nothing would train in this stage.")
        return lrs

    def check(self, n_groups: int) -> None:
        """Validate the stage against a model with ``n_groups`` layer groups."""
        try:
            check_freeze_to(self.freeze_to, n_groups)
        except ValueError as exc:
            raise ValueError(f"{self.name or 'Stage'}: {exc}") from None
        self.lrs(n_groups)

    def lr_schedule(self, n_groups: int) -> Schedule:
        return one_cycle_lr(np.array(self.lrs(n_groups)), self.pct_start, self.div, self.div_final)

    def mom_schedule(self, default: Sequence[float]) -> Schedule:
        return one_cycle_mom(self.moms or default, self.pct_start)

    @classmethod
    def from_milestones(cls, milestones: Mapping[int, Mapping[str, Any]]) -> list[Stage]:
        """Read the original example's milestone dict into a plan.

        Keys are 1-based epochs at which a milestone starts; each value has ``freeze_to``,
        ``duration`` (epochs), ``lrs`` (one peak LR per group, 0 for frozen groups) and
        optionally ``pct_start`` and torch ``OneCycleLR``'s knobs: ``div_factor`` (→ ``div``),
        ``final_div_factor`` (torch divides the *initial* LR by it, so ``div_final`` becomes
        ``div_factor * final_div_factor``), ``base_momentum`` and ``max_momentum`` (→ ``moms =
        (max, base, max)``).

        Raises:
            ValueError: An unknown or missing key, a gap or an overlap between milestones, lists
                of ``lrs`` of different lengths; the message names the milestone.

        Examples:
            >>> plan = Stage.from_milestones({
            ...     1: {"freeze_to": -1, "duration": 1, "pct_start": 0.3, "lrs": [0, 1e-3]},
            ...     2: {"freeze_to": 0, "duration": 2, "pct_start": 0.3, "lrs": [1e-5, 1e-4]},
            ... })
            >>> [(s.freeze_to, s.epochs) for s in plan]
            [(-1, 1), (0, 2)]
        """
        if not isinstance(milestones, Mapping) or not milestones:
            raise ValueError(
                f"milestones must be a non-empty dict {{epoch: {{...}}}}, got {milestones!r}."
            )
        stages = []
        expected_epoch = 1
        n_lrs = None
        for epoch in sorted(milestones):
            label = f"milestones[{epoch!r}]"
            if isinstance(epoch, bool) or not isinstance(epoch, int):
                raise ValueError(f"{label}: keys must be int epochs (1-based), got {epoch!r}.")
            spec = milestones[epoch]
            if not isinstance(spec, Mapping):
                raise ValueError(f"{label} must be a dict, got {type(spec).__name__}.")
            unknown = set(spec) - _MILESTONE_KEYS - _MILESTONE_OPTIONAL
            if unknown:
                raise ValueError(
                    f"{label} has unknown key(s) {sorted(unknown)}; known keys are "
                    f"{sorted(_MILESTONE_KEYS | _MILESTONE_OPTIONAL)}."
                )
            missing = _MILESTONE_KEYS - set(spec)
            if missing:
                raise ValueError(f"{label} lacks key(s) {sorted(missing)}.")
            if epoch < expected_epoch:
                raise ValueError(
                    f"{label} starts at epoch {epoch}, inside the previous milestone (which runs "
                    f"until epoch {expected_epoch - 1}); milestones must not overlap."
                )
            if epoch > expected_epoch:
                raise ValueError(
                    f"{label} starts at epoch {epoch}, but the previous milestone ends at epoch "
                    f"{expected_epoch - 1}: epochs {expected_epoch}..{epoch - 1} have no milestone "
                    "(the first milestone is epoch 1)."
                )
            lrs = spec["lrs"]
            if not isinstance(lrs, (Sequence, np.ndarray)) or isinstance(lrs, str):
                raise ValueError(
                    f"{label}['lrs'] must be a list with one LR per group, got {lrs!r}."
                )
            if n_lrs is not None and len(lrs) != n_lrs:
                raise ValueError(
                    f"{label}['lrs'] has {len(lrs)} values but earlier milestones have {n_lrs}; "
                    "give one LR per layer group in every milestone."
                )
            n_lrs = len(lrs)
            div = spec.get("div_factor", 25.0)
            moms = None
            if "base_momentum" in spec or "max_momentum" in spec:
                base, top = spec.get("base_momentum", 0.85), spec.get("max_momentum", 0.95)
                moms = (top, base, top)
            duration = spec["duration"]
            stages.append(
                cls(
                    freeze_to=spec["freeze_to"],
                    epochs=duration,
                    lr_max=list(lrs),
                    pct_start=spec.get("pct_start", 0.25),
                    div=div,
                    div_final=div * spec.get("final_div_factor", 1e4),
                    moms=moms,
                    name=label,
                )
            )
            expected_epoch = epoch + (duration if isinstance(duration, int) else 1)
        return stages


def check_plan(stages: Any, n_groups: int | None) -> list[Stage]:
    """Validate a plan for a model with ``n_groups`` layer groups (``None``: types only)."""
    if isinstance(stages, Stage):
        stages = [stages]
    if isinstance(stages, Mapping):
        raise TypeError(
            "got a dict: convert milestone dicts with Stage.from_milestones(milestones)."
        )
    stages = list(stages)
    if not stages or not all(isinstance(s, Stage) for s in stages):
        raise TypeError(f"a plan is a non-empty list of Stage, got {stages!r}.")
    if n_groups is not None:
        for stage in stages:
            stage.check(n_groups)
    return stages


class GradualUnfreezing(Callback):
    """Run a stage plan inside one ``trainer.fit`` of your own ``LightningModule`` and ``Trainer``.

    At the first epoch of each stage it sets the frozen pattern (normalisation layers stay
    trainable with ``train_bn=True``) and, before every optimizer step, every layer group's LR and
    momentum from the stage's one-cycle. The module's ``configure_optimizers`` may return a plain
    optimizer over all params: the callback regroups it once, at the start of the fit, into one
    named param group per layer group (two with ``wd_bn_bias=False``), so
    ``LearningRateMonitor`` shows readable tags and nothing is added mid-training. Its state
    (stage and step) is saved in checkpoints, so ``trainer.fit(..., ckpt_path=...)`` resumes the
    plan where it stopped.

    Under a multi-process strategy (DDP) it refuses to start: DDP registers only the params that
    train when it wraps the model, so params unfrozen later would never be synchronised. Use
    ``Learner.fit_stages``, which starts a fresh Trainer (and DDP wrapper) per stage.

    Args:
        stages: The plan (``Stage`` list, or ``Stage.from_milestones(...)``).
        splitter: ``splitter(module)`` giving the layer groups; else the module's
            ``model_splits()``, else a built-in splitter.
        train_bn: Keep normalisation layers trainable in frozen groups.
        wd_bn_bias: Also decay biases and normalisation params.
        moms: Default one-cycle momentum for stages without their own.

    Examples:
        >>> cb = GradualUnfreezing([Stage(-1, 1, 1e-3), Stage(0, 2, slice(1e-5, 1e-3))])
        >>> # trainer = pl.Trainer(max_epochs=3, callbacks=[cb]); trainer.fit(module, ...)
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        splitter: Splitter | None = None,
        train_bn: bool = True,
        wd_bn_bias: bool = False,
        moms: Sequence[float] = (0.95, 0.85, 0.95),
    ) -> None:
        self.stages = check_plan(stages, n_groups=None)  # against the model at setup
        self.splitter = splitter
        self.train_bn = train_bn
        self.wd_bn_bias = wd_bn_bias
        self.moms = check_moms(moms)
        self.stage = 0
        self.stage_step = 0
        self.groups: list[LayerGroup] = []
        self._applied = -1
        self._steps_per_epoch = 1
        self._scheduler: ParamScheduler | None = None
        self._scheduler_stage = -1

    @property
    def starts(self) -> list[int]:
        """First epoch (0-based) of each stage."""
        return list(np.cumsum([0] + [s.epochs for s in self.stages])[:-1])

    def _stage_of(self, epoch: int) -> int:
        return max(i for i, start in enumerate(self.starts) if start <= epoch)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise ValueError(
                f"GradualUnfreezing cannot change which params train inside one fit under "
                f"{type(trainer.strategy).__name__} with {trainer.world_size} processes: DDP "
                "registers only the params that train when it wraps the model, so the replicas "
                "would drift apart. Use difflr.Learner(...).fit_stages(stages), which wraps the "
                "model afresh for each stage."
            )
        self.groups = split_model(pl_module, self.splitter)
        check_plan(self.stages, len(self.groups))
        plan_epochs = sum(s.epochs for s in self.stages)
        if trainer.max_epochs is not None and 0 < trainer.max_epochs < plan_epochs:
            warnings.warn(
                f"the plan has {plan_epochs} epochs but Trainer(max_epochs={trainer.max_epochs}) "
                "stops before its end.",
                stacklevel=2,
            )
        # Freeze before the strategy sets up, so the first stage's pattern is in place.
        self._freeze(pl_module, self.stage)

    def _freeze(self, pl_module: pl.LightningModule, stage: int) -> None:
        pattern = frozen_pattern(self.stages[stage].freeze_to, len(self.groups))
        apply_freeze(pl_module, self.groups, pattern, self.train_bn)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"GradualUnfreezing drives one optimizer, got {len(trainer.optimizers)}; return "
                "a single optimizer from configure_optimizers."
            )
        if trainer.lr_scheduler_configs:
            raise ValueError(
                "GradualUnfreezing sets the LR of every step itself; return only an optimizer "
                "(no LR scheduler) from configure_optimizers."
            )
        optimizer = trainer.optimizers[0]
        if not any(GROUP_INDEX_KEY in pg for pg in optimizer.param_groups):
            _regroup(optimizer, pl_module, self.groups, self.wd_bn_bias)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps_per_epoch = max(
            1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage_of(trainer.current_epoch)
        if stage != self.stage:
            self.stage, self.stage_step = stage, 0
        n = len(self.groups)
        if trainer.current_epoch == self.starts[self.stage] and self.stage > 0:
            previous = frozen_pattern(self.stages[self.stage - 1].freeze_to, n)
            if frozen_pattern(self.stages[self.stage].freeze_to, n) != previous:
                # A new pattern drops the momentum buffers, as Learner.freeze_to does. Decided by
                # the plan alone, so a run resumed at this epoch does the same.
                trainer.optimizers[0].state.clear()
        if self._applied != self.stage:
            self._freeze(pl_module, self.stage)
            self._applied = self.stage
        if self._scheduler is None or self._scheduler_stage != self.stage:
            # The stage's one-cycle, by the same ParamScheduler that Learner.fit_stages uses.
            current = self.stages[self.stage]
            self._scheduler = ParamScheduler(
                current.lr_schedule(n), current.mom_schedule(self.moms)
            )
            self._scheduler.step = self.stage_step  # > 0 when resuming inside the stage
            self._scheduler.attach(trainer.optimizers[0], current.epochs * self._steps_per_epoch)
            self._scheduler_stage = self.stage

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._scheduler.on_before_optimizer_step(trainer, pl_module, optimizer)
        self.stage_step = self._scheduler.step

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._scheduler.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "stage_step": self.stage_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = int(state_dict["stage"])
        self.stage_step = int(state_dict["stage_step"])


def _regroup(
    optimizer: torch.optim.Optimizer,
    module: torch.nn.Module,
    groups: Sequence[LayerGroup],
    wd_bn_bias: bool,
) -> None:
    """Replace a plain optimizer's param groups by one per layer group, in place (the object
    Lightning holds stays the same), keeping its hyper-parameters."""
    if len(optimizer.param_groups) != 1:
        raise ValueError(
            f"the optimizer has {len(optimizer.param_groups)} param groups without a "
            f"'{GROUP_INDEX_KEY}' key; return an optimizer over all params in one group "
            "(torch.optim.AdamW(self.parameters())) and GradualUnfreezing will split it."
        )
    hypers = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    covered = {id(p) for p in optimizer.param_groups[0]["params"]}
    missing = [p for g in groups for p in g.params if id(p) not in covered]
    if missing:
        raise ValueError(
            f"{len(missing)} params of the layer groups are not in the optimizer; build it over "
            "all of the module's params (frozen ones included)."
        )
    optimizer.param_groups.clear()
    optimizer.state.clear()
    for pg in build_param_groups(module, groups, wd_bn_bias):
        extra = {"weight_decay": 0.0} if pg.get("no_decay") and "weight_decay" in hypers else {}
        optimizer.add_param_group({**hypers, **pg, **extra})
