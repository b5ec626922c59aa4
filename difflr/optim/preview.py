"""Previews: every optimizer step's LR and momentum of a plan, per layer group, without training.

`preview_plan` asks each `difflr.policy.stages.Stage` for the schedules that would train it
(the ones `difflr.callbacks.scheduler.stage_scheduler` hands to the scheduler), so a preview and
the training cannot disagree; `SchedulePreview.plot_sched` draws it as the recorder draws a
finished fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from difflr.optim.param_groups import (
    layer_group_index,
    layer_group_names,
    momentum_key,
    read_hypers,
)
from difflr.policy.freeze import frozen_pattern
from difflr.policy.lr import LRSpec, expand_lrs

if TYPE_CHECKING:
    from matplotlib.figure import Figure
from difflr.policy.plateau import Anneal, stage_length
from difflr.policy.schedules import DEFAULT_MOMS, sample
from difflr.policy.stages import Stage, check_plan
from difflr.utils.checks import check_number, is_int

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
        stand_ins: The stages whose LR is found when they start (``lr_max="valley"``) and is
            drawn with a stand-in (the default LR's head value), not a found one.
    """

    lrs: np.ndarray
    moms: np.ndarray
    names: list[str]
    boundaries: list[int]
    trainable: list[list[bool]]
    stand_ins: list[int] = field(default_factory=list)

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
    plateau_at: Mapping[int, int] | None = None,
    found_lrs: Mapping[int, float] | None = None,
) -> SchedulePreview:
    """Every step's LR and momentum of a plan, computed by the schedulers that would train it.

    A stage with ``patience`` is drawn over its maximum ``epochs`` unless ``plateau_at`` gives
    the epoch (0-based, within the stage) at whose end its plateau is detected: it then runs
    `difflr.policy.plateau.stage_length` epochs, its tail remapped as training remaps it.
    A stage whose LR is found at its start (``lr_max="valley"``) cannot be known before it
    runs: it is drawn with ``found_lrs[k]`` if given (``recorder.stage_lrs`` of the fit shows
    the schedule it followed), else with the head group's ``default_lr`` as a stand-in (the
    preview's ``stand_ins`` lists those stages).

    Args:
        stages: The plan, checked against the optimizer's layer groups.
        optimizer: The optimizer the plan would drive (its groups and current momentum).
        frozen: The frozen pattern in place now (for stages with ``freeze_to=None``).
        steps_per_epoch: Optimizer steps per epoch in one process.
        default_lr: What stages without ``lr_max`` use.
        default_moms: What one-cycle stages without ``moms`` use.
        plateau_at: ``{stage_index: epoch}`` for stages with ``patience``.
        found_lrs: ``{stage: lr}`` for stages whose LR is found at their start.

    Raises:
        ValueError: A stage does not fit the optimizer's groups; ``plateau_at`` names a stage
            without ``patience``, or an epoch at whose end no plateau can be detected (before
            ``patience`` epochs, or the stage's last); ``found_lrs`` names a stage whose LR is
            given, or holds an LR that is not a finite number > 0; a stage finds its LR and
            there is neither a found LR nor a ``default_lr`` to stand in.
    """
    index = layer_group_index(optimizer)
    n_groups = max(index) + 1
    stages = check_plan(stages, n_groups, default_lr)
    plateau_at = _check_plateau_at(stages, plateau_at)
    found = dict(found_lrs or {})
    given = [k for k in found if not (is_int(k) and 0 <= k < len(stages) and stages[k].finds_lr)]
    if given:
        finding = [k for k, stage in enumerate(stages) if stage.finds_lr]
        raise ValueError(
            f"found_lrs names stage(s) {given}, which do not find their LR; the stages that do "
            f"(lr_max='valley') are {finding}."
        )
    for k, lr in found.items():
        check_number(lr, f"found_lrs[{k}]", 0, what=f"stage {k}'s head LR", example="3e-4")
    stand_ins = []
    for k, stage in enumerate(stages):
        if stage.finds_lr and k not in found:
            if default_lr is None:
                raise ValueError(
                    f"stage {k} finds its LR when it starts; pass found_lrs={{{k}: lr}} to "
                    "preview it with that LR."
                )
            found[k] = expand_lrs(default_lr, n_groups)[-1]
            stand_ins.append(k)
    stages = [
        stage.with_found_lr(found[k]) if stage.finds_lr else stage for k, stage in enumerate(stages)
    ]
    lrs, moms, boundaries, trainable = [], [], [], []
    pattern = list(frozen)
    for stage in stages:
        boundaries.append(sum(len(x) for x in lrs))
        if stage.freeze_to is not None:
            pattern = frozen_pattern(stage.freeze_to, n_groups)
        trainable.append([not f for f in pattern])
        mom_sched = stage.mom_schedule(default_moms) if momentum_key(optimizer) else None
        total = stage.n_steps(steps_per_epoch)
        plateau = plateau_at.get(len(boundaries) - 1)
        run = stage_length(stage.epochs, plateau, stage.anneal_epochs) * steps_per_epoch
        anneal = None
        if plateau is not None and run > (plateau + 1) * steps_per_epoch:
            start = (plateau + 1) * steps_per_epoch
            anneal = Anneal.at(start, total, run - start, stage.pct_start)
        stage_lrs, stage_moms = sample(
            stage.lr_schedule(n_groups, default_lr), mom_sched, total, n_groups, anneal, run
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
        stand_ins,
    )


def _check_plateau_at(stages: Sequence[Stage], plateau_at: Any) -> dict[int, int]:
    if plateau_at is None:
        return {}
    if not isinstance(plateau_at, Mapping):
        raise TypeError(
            f"plateau_at must be a dict {{stage_index: epoch}}, got {plateau_at!r}; e.g. "
            "plateau_at={1: 3} for a plateau detected at the end of stage 1's epoch 3 (0-based)."
        )
    checked = {}
    for k, epoch in plateau_at.items():
        if not (is_int(k) and 0 <= k < len(stages)) or stages[k].patience is None:
            raise ValueError(
                f"plateau_at names stage {k!r}, but the plan's stages with patience are "
                f"{[i for i, s in enumerate(stages) if s.patience is not None]}."
            )
        stage = stages[k]
        low, high = stage.patience - 1, stage.epochs - 2
        if not is_int(epoch):
            raise TypeError(
                f"plateau_at[{k}] must be an int (an epoch of stage {k}, 0-based), got {epoch!r}."
            )
        if not low <= epoch <= high:
            raise ValueError(
                f"plateau_at[{k}] is {epoch!r}, but stage {k} (patience={stage.patience}, at most "
                f"{stage.epochs} epochs) can detect a plateau only at the end of its epochs "
                f"{low}..{high} (0-based; a plateau at its last epoch changes nothing)."
            )
        checked[int(k)] = int(epoch)
    return checked
