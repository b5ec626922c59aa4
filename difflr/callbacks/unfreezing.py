"""`GradualUnfreezing`: a stage plan run inside one ``trainer.fit`` of your own LightningModule.

The plan is the same list of `difflr.policy.stages.Stage` that ``Learner.fit_stages`` runs; each
stage is entered by `difflr.optim.stage_entry.enter_stage` and scheduled by the same
`difflr.callbacks.scheduler.ParamScheduler`, so both ways of running a plan train alike."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from difflr.callbacks.plateau import StagePlateau, check_watch_args
from difflr.callbacks.scheduler import ParamScheduler, stage_scheduler
from difflr.groups.freezing import apply_freeze, frozen_norms_eval
from difflr.groups.layers import LayerGroup, Splitter
from difflr.groups.splitters import split_model
from difflr.optim.param_groups import GROUP_INDEX_KEY, build_param_groups
from difflr.optim.stage_entry import enter_stage
from difflr.policy.freeze import frozen_pattern
from difflr.policy.plateau import Anneal
from difflr.policy.schedules import DEFAULT_MOMS, steps_per_epoch
from difflr.policy.stages import Stage, check_plan
from difflr.utils.checks import check_moms, user_stacklevel

__all__ = ["GradualUnfreezing"]


class GradualUnfreezing(Callback):
    """Run a stage plan inside one ``trainer.fit`` of your own ``LightningModule`` and ``Trainer``.

    At the first epoch of each stage it sets the frozen pattern (normalisation layers stay
    trainable with ``train_bn=True``) and the stage's weight decay and, before every optimizer
    step, every layer group's LR and momentum from the stage's schedule. The module's ``configure_optimizers`` may return a plain
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

    Every stage needs its own ``lr_max`` here (there is no Learner to take a default from), a
    number or a slice: an LR found at a stage's start (``lr_max="valley"``) is refused (find it
    with ``difflr.LRFinder(milestones=...)``, or run the plan with ``Learner.fit_stages``). A
    stage with ``freeze_to=None`` keeps the pattern of the stage before it. A stage with
    ``patience`` ends at its plateau (after its annealing tail) and the next one starts at the
    next epoch, so the stages' first epochs are known only as they happen (`starts`); in a plan
    with such stages the fit stops when the last stage ends (give ``max_epochs`` >= the plan's
    maximum). ``restore_best`` loads the stage's best weights at its end,
    before that epoch's checkpoint. A ``monitor`` is read from the epoch's logged values (the
    recorder's smoothed ``train_loss`` if a `difflr.Recorder` is among the callbacks) and a
    missing one is refused at the stage's first epoch end, naming the values there are.

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
        moms: Sequence[float] = DEFAULT_MOMS,
    ) -> None:
        self.stages = check_plan(stages)  # against the model at setup
        check_watch_args(self.stages)
        finding = [k for k, stage in enumerate(self.stages) if stage.finds_lr]
        if finding:
            raise ValueError(
                f"stage(s) {finding} find their LR when they start (lr_max="
                f"{self.stages[finding[0]].lr_max!r}), which needs a range test between two "
                "fits: inside your Trainer's one fit, give them an lr_max (run "
                "difflr.LRFinder(milestones=...) to find it at those epochs), or run the plan "
                "with Learner.fit_stages."
            )
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
        self._watch: StagePlateau | None = None
        #: The last epoch of each stage that ended at a plateau.
        self.ended_at: dict[int, int] = {}
        self._resumed: dict[str, Any] = {}
        self._decided = -1  # the epoch whose end was decided

    @property
    def starts(self) -> list[int]:
        """First epoch (0-based) of each stage, as far as the fit has decided: after a stage that
        ended at a plateau, the next epoch; after the others, their maximum length. A stage not
        reached yet is listed at its planned start (a fit that stops sooner, e.g. at
        ``max_epochs``, never reaches it)."""
        starts, start = [], 0
        for k, stage in enumerate(self.stages):
            starts.append(start)
            start = self.ended_at[k] + 1 if k in self.ended_at else start + stage.epochs
        return starts

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
                stacklevel=user_stacklevel(),
            )
        # Each stage's pattern; a stage with freeze_to=None keeps the one before it (None: the
        # module's own, untouched).
        self._patterns: list[list[bool] | None] = []
        pattern = None
        for s in self.stages:
            if s.freeze_to is not None:
                pattern = frozen_pattern(s.freeze_to, len(self.groups))
            self._patterns.append(pattern)
        # Freeze before the strategy sets up, so the first stage's pattern is in place.
        self._freeze(pl_module, self.stage)

    def _freeze(self, pl_module: pl.LightningModule, stage: int) -> None:
        if self._patterns[stage] is not None:
            apply_freeze(pl_module, self.groups, self._patterns[stage], self.train_bn)

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
        self._steps_per_epoch = steps_per_epoch(
            trainer.num_training_batches, trainer.accumulate_grad_batches
        )
        if not self.train_bn:  # not at setup: Lightning warns of eval modules before this hook
            frozen_norms_eval(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage_of(trainer.current_epoch)
        if stage != self.stage:
            self.stage, self.stage_step = stage, 0
        optimizer = trainer.optimizers[0]
        if self._applied != self.stage:
            # At a stage's first epoch, a new pattern drops the momentum buffers, as
            # Learner.freeze_to does: decided by the plan alone, so a run resumed at this epoch
            # does the same. Resumed inside a stage, the checkpoint's state is the stage's own.
            starts_stage = trainer.current_epoch == self.starts[self.stage] and self.stage > 0
            pattern = self._patterns[self.stage]
            enter_stage(
                pl_module,
                self.groups,
                optimizer,
                pattern,
                previous=self._patterns[self.stage - 1] if starts_stage else pattern,
                train_bn=self.train_bn,
                wd=self.stages[self.stage].wd,
            )
            self._applied = self.stage
        if self._scheduler is None or self._scheduler_stage != self.stage:
            # The stage's schedule, by the same ParamScheduler that Learner.fit_stages uses.
            current = self.stages[self.stage]
            resumed = self._resumed if self._resumed.get("stage") == self.stage else {}
            self._resumed = {}
            self._scheduler = stage_scheduler(current, optimizer, default_moms=self.moms)
            self._scheduler.step = self.stage_step  # > 0 when resuming inside the stage
            self._scheduler.tail = Anneal.from_list(resumed.get("tail"))
            self._scheduler.attach(optimizer, current.n_steps(self._steps_per_epoch))
            self._scheduler_stage = self.stage
            self._watch = None
            if current.watches:
                self._watch = StagePlateau(current, self._scheduler, stop=False)
                self._watch.start(trainer)
                if "watch" in resumed:
                    self._watch.load_state_dict(resumed["watch"])

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The validation that ends an epoch comes before on_train_epoch_end, and a user's
        # ModelCheckpoint may save at its end (save_on_train_epoch_end=False, or validation
        # every n epochs): decide there, so the file holds the decision, the tail and the
        # restored weights.
        if (
            trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        ):
            self._end_of_epoch(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_of_epoch(trainer, pl_module)  # an epoch without validation

    def _end_of_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._scheduler_stage != self.stage or self._decided == trainer.current_epoch:
            return
        self._decided = trainer.current_epoch
        epoch, start = trainer.current_epoch, self.starts[self.stage]
        last = epoch >= start + self.stages[self.stage].epochs - 1
        if self._watch is not None and self._watch.end_of_epoch(trainer, pl_module, epoch - start):
            if not last:
                self.ended_at[self.stage] = epoch
            last = True
        if last and self.stage == len(self.stages) - 1 and any(s.watches for s in self.stages):
            # A plan whose length is decided by plateaus ends the fit when its last stage ends
            # (max_epochs is only a cap); a fixed plan keeps the last stage's final LR after it.
            trainer.should_stop = True

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
        state: dict[str, Any] = {
            "stage": self.stage,
            "stage_step": self.stage_step,
            "ended_at": [[k, e] for k, e in sorted(self.ended_at.items())],
        }
        if self._scheduler is not None and self._scheduler_stage == self.stage:
            state["tail"] = None if self._scheduler.tail is None else self._scheduler.tail.to_list()
            if self._watch is not None:
                state["watch"] = self._watch.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = int(state_dict["stage"])
        self.stage_step = int(state_dict["stage_step"])
        self.ended_at = {int(k): int(e) for k, e in state_dict.get("ended_at", [])}
        # Given to the stage's scheduler and watch when the resumed epoch starts.
        self._resumed = {"stage": self.stage, **state_dict}


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
