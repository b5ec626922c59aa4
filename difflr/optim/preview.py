"""Previews: every optimizer step's LR and momentum of a plan, per layer group, without training.

`preview_plan` asks each `difflr.policy.stages.Stage` for the schedules that would train it
(the ones `difflr.callbacks.scheduler.stage_scheduler` hands to the scheduler), so a preview and
the training cannot disagree; `SchedulePreview.plot_sched` draws it as the recorder draws a
finished fit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from difflr.optim.param_groups import (
    layer_group_index,
    layer_group_names,
    momentum_key,
    read_hypers,
)
from difflr.policy.freeze import frozen_pattern
from difflr.policy.lr import LRSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure
from difflr.policy.schedules import DEFAULT_MOMS, sample
from difflr.policy.stages import Stage, check_plan

__all__ = ["SchedulePreview", "preview_plan"]


@dataclass
class SchedulePreview:
    """The schedule a plan would follow, per optimizer step and layer group.

    Attributes:
        lrs: ``(n_steps, n_groups)`` LRs.
        moms: ``(n_steps, n_groups)`` momentums (NaN for optimizers without one).
        names: The layer groups' names.
        boundaries: First step of each stage.
        trainable: Which groups train in each stage.
    """

    lrs: np.ndarray
    moms: np.ndarray
    names: list[str]
    boundaries: list[int]
    trainable: list[list[bool]]

    def plot_sched(self) -> Figure:
        """Every group's LR and momentum, as ``Recorder.plot_sched`` draws a finished fit."""
        from difflr.plotting import plot_sched

        return plot_sched(self.lrs, self.moms, self.names, self.boundaries[1:], self.trainable)


def preview_plan(
    stages: Sequence[Stage],
    optimizer: torch.optim.Optimizer,
    frozen: Sequence[bool],
    steps_per_epoch: int,
    default_lr: LRSpec | None = None,
    default_moms: Sequence[float] = DEFAULT_MOMS,
) -> SchedulePreview:
    """Every step's LR and momentum of a plan, computed by the schedulers that would train it.

    Args:
        stages: The plan, checked against the optimizer's layer groups.
        optimizer: The optimizer the plan would drive (its groups and current momentum).
        frozen: The frozen pattern in place now (for stages with ``freeze_to=None``).
        steps_per_epoch: Optimizer steps per epoch in one process.
        default_lr: What stages without ``lr_max`` use.
        default_moms: What one-cycle stages without ``moms`` use.
    """
    index = layer_group_index(optimizer)
    n_groups = max(index) + 1
    stages = check_plan(stages, n_groups, default_lr)
    lrs, moms, boundaries, trainable = [], [], [], []
    pattern = list(frozen)
    for stage in stages:
        boundaries.append(sum(len(x) for x in lrs))
        if stage.freeze_to is not None:
            pattern = frozen_pattern(stage.freeze_to, n_groups)
        trainable.append([not f for f in pattern])
        mom_sched = stage.mom_schedule(default_moms) if momentum_key(optimizer) else None
        stage_lrs, stage_moms = sample(
            stage.lr_schedule(n_groups, default_lr),
            mom_sched,
            stage.n_steps(steps_per_epoch),
            n_groups,
        )
        if stage_moms is None:  # the schedule leaves momentum where it is
            stage_moms = np.tile(read_hypers(optimizer)[1], (len(stage_lrs), 1))
        lrs.append(stage_lrs)
        moms.append(stage_moms)
    return SchedulePreview(
        np.concatenate(lrs),
        np.concatenate(moms),
        layer_group_names(optimizer),
        boundaries,
        trainable,
    )
