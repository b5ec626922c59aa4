"""The per-step hyper-parameter scheduler: every layer group's LR and momentum, set before each
optimizer step from schedules of ``pct``.

It works on any ``Trainer`` whose (single) optimizer has one or more torch param groups per
layer group, each carrying the layer group's index under ``"layer_group"`` (as
`difflr.optim.param_groups.build_param_groups` makes them). An optimizer without that key is
treated as one layer group per param group, so the scheduler also drops into a hand-written
module."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from difflr.optim.param_groups import (
    layer_group_index,
    momentum_key,
    write_hypers,
)
from difflr.policy.lr import LRSpec
from difflr.policy.plateau import Anneal
from difflr.policy.schedules import DEFAULT_MOMS, Schedule, sample, values_at
from difflr.policy.stages import Stage

if TYPE_CHECKING:
    pass

__all__ = ["ParamScheduler", "single_optimizer", "stage_scheduler"]


class ParamScheduler(Callback):
    """Set every layer group's LR (and momentum) before each optimizer step from schedules of pct.

    Step ``i`` of a fit of ``total_steps`` optimizer steps uses ``pct = i / total_steps``. The total
    is Lightning's ``trainer.estimated_stepping_batches`` (which accounts for
    ``accumulate_grad_batches``, ``limit_train_batches``, ``max_steps`` and DDP sharding) unless
    given. Steps past the end keep the final value. The step counter is saved in checkpoints, so a
    resumed fit continues the same curve. `anneal` starts a plateau's tail
    (`difflr.policy.plateau.Anneal`): from then on ``pct`` is remapped, and the tail is saved too.

    Args:
        lr_sched: ``pct -> array`` of one LR per layer group.
        mom_sched: ``pct -> momentum`` (a float or one per group), or ``None`` to leave momentum.
        total_steps: Number of optimizer steps of the fit; ``None`` asks the Trainer.

    Examples:
        >>> from difflr.policy.schedules import one_cycle_lr, one_cycle_mom
        >>> sched = ParamScheduler(one_cycle_lr([1e-5, 1e-4, 1e-3]), one_cycle_mom())
    """

    def __init__(
        self, lr_sched: Schedule, mom_sched: Schedule | None = None, total_steps: int | None = None
    ) -> None:
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        self.lr_sched = lr_sched
        self.mom_sched = mom_sched
        self.total_steps = total_steps
        self.step = 0
        self._stepped = False
        self._index: list[int] = []
        self._n_groups = 0
        self._key: str | None = None
        self._total = 1
        self.tail: Anneal | None = None

    def anneal(self, optimizer: torch.optim.Optimizer, steps: int, pct_start: float) -> Anneal:
        """Jump to the annealing phase now: the next ``steps`` optimizer steps run the schedule
        from ``max(pct_now, pct_start)`` to 1 (`difflr.policy.plateau.Anneal.at`); the next
        step's values are put in place."""
        self.tail = Anneal.at(self.step, self._total, steps, pct_start)
        self._apply(optimizer)
        return self.tail

    def values(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The LRs and momentums (one per layer group) of optimizer step ``step`` (0-based)."""
        n_groups = self._n_groups or np.asarray(self.lr_sched(0.0)).size
        return values_at(self.lr_sched, self.mom_sched, step, self._total, n_groups, self.tail)

    def schedule(
        self, total_steps: int, index: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Every step's values for a fit of ``total_steps`` steps (what training uses), for an
        optimizer whose param groups map to layer groups ``index``. Returns ``(lrs, moms)`` of
        shape ``(total_steps, n_groups)``."""
        return sample(self.lr_sched, self.mom_sched, int(total_steps), max(index) + 1)

    def _configure(self, total_steps: int, index: Sequence[int]) -> None:
        self._total = int(total_steps)
        self._index = list(index)
        self._n_groups = max(self._index) + 1

    def attach(self, optimizer: torch.optim.Optimizer, total_steps: float) -> None:
        """Drive ``optimizer`` over ``total_steps`` steps from ``self.step`` on, and put the
        current step's values in place (before its first batch)."""
        if not math.isfinite(total_steps) or total_steps < 1:
            raise ValueError(
                f"cannot schedule over {total_steps} optimizer steps: the training data has no "
                "length (an IterableDataset), so the schedule cannot know where it ends. Give the "
                "dataset a __len__, or pass limit_train_batches=<batches per epoch> (an int); in "
                "your own Trainer, max_steps works too."
            )
        self._key = momentum_key(optimizer)
        self._configure(int(total_steps), layer_group_index(optimizer))
        self._apply(optimizer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(
            single_optimizer(trainer), self.total_steps or trainer.estimated_stepping_batches
        )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # The optimizer already holds this step's values (written when the previous step ended),
        # so monitors reading it during the batch (LearningRateMonitor) see what the step uses.
        self.step += 1
        self._stepped = True

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._stepped:
            self._apply(trainer.optimizers[0])
            self._stepped = False

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        lrs, moms = self.values(self.step)
        write_hypers(optimizer, lrs, moms, self._index, self._key)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step}
        if self.tail is not None:
            state["tail"] = self.tail.to_list()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tail = Anneal.from_list(state_dict.get("tail"))


def single_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    if len(trainer.optimizers) != 1:
        raise ValueError(
            f"difflr's callbacks drive one optimizer, the Trainer has {len(trainer.optimizers)}; "
            "return a single optimizer from configure_optimizers."
        )
    return trainer.optimizers[0]


def stage_scheduler(
    stage: Stage,
    optimizer: torch.optim.Optimizer,
    default_lr: LRSpec | None = None,
    default_moms: Sequence[float] = DEFAULT_MOMS,
) -> ParamScheduler:
    """The `ParamScheduler` that drives ``optimizer`` through ``stage``."""
    n_groups = max(layer_group_index(optimizer)) + 1
    mom_sched = stage.mom_schedule(default_moms) if momentum_key(optimizer) else None
    return ParamScheduler(stage.lr_schedule(n_groups, default_lr), mom_sched)
