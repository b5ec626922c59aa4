"""Schedules: pure functions of ``pct``, the fraction of a fit's optimizer steps done, in [0, 1].

Every schedule maps ``pct`` to a value, or to an array of values (one per layer group) when its
bounds are arrays: the same one-cycle shape then drives every group with its own peak LR. Step
``i`` of a fit of ``N`` steps uses ``pct = i / N``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeAlias

import numpy as np

from difflr.policy.plateau import Anneal, scheduled_pct

__all__ = [
    "DEFAULT_MOMS",
    "Schedule",
    "Value",
    "combine_scheds",
    "exp_range",
    "flat_cos_lr",
    "one_cycle_lr",
    "one_cycle_mom",
    "sample",
    "sched_const",
    "sched_cos",
    "sched_exp",
    "sched_lin",
    "steps_per_epoch",
    "values_at",
]

Value: TypeAlias = "float | np.ndarray"
Schedule: TypeAlias = "Callable[[float], Value]"

#: fastai's one-cycle momentum: start, at the LR's peak, end.
DEFAULT_MOMS: tuple[float, float, float] = (0.95, 0.85, 0.95)


def sched_lin(start: Value, end: Value, pct: float) -> Value:
    """Linear interpolation from ``start`` (pct=0) to ``end`` (pct=1)."""
    return start + pct * (end - start)


def sched_cos(start: Value, end: Value, pct: float) -> Value:
    """Half-cosine from ``start`` (pct=0) to ``end`` (pct=1), flat at both ends."""
    return start + (1 + math.cos(math.pi * (1 - pct))) * (end - start) / 2


def sched_exp(start: Value, end: Value, pct: float) -> Value:
    """Geometric interpolation: ``start * (end / start) ** pct`` (the LR range test's sweep)."""
    return start * (end / start) ** pct


def sched_const(value: Value) -> Schedule:
    """A schedule that is ``value`` everywhere."""
    return lambda pct: value


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Schedule]) -> Schedule:
    """Chain schedules: phase ``k`` takes fraction ``pcts[k]`` of the steps and runs ``scheds[k]``
    over its own local ``pct`` in [0, 1].

    Args:
        pcts: Fractions of the phases, each >= 0, summing to 1.
        scheds: One schedule per phase.

    Raises:
        ValueError: The lengths differ or the fractions do not sum to 1.
    """
    if len(pcts) != len(scheds) or not pcts:
        raise ValueError(
            f"combine_scheds got {len(pcts)} fractions for {len(scheds)} schedules; give one "
            "fraction per phase."
        )
    if any(p < 0 for p in pcts) or not math.isclose(sum(pcts), 1.0, abs_tol=1e-9):
        raise ValueError(f"phase fractions {list(pcts)} must be >= 0 and sum to 1.")
    bounds = np.cumsum([0.0, *pcts])

    def schedule(pct: float) -> Value:
        pct = min(max(pct, 0.0), 1.0)
        # The last phase that has started owns pct (zero-length phases are skipped).
        k = max(i for i in range(len(scheds)) if bounds[i] <= pct and (pcts[i] > 0 or pct == 1))
        local = (pct - bounds[k]) / pcts[k] if pcts[k] > 0 else 1.0
        return scheds[k](min(local, 1.0))

    return schedule


def one_cycle_lr(
    lr_max: Value, pct_start: float = 0.25, div: float = 25.0, div_final: float = 1e5
) -> Schedule:
    """fastai's one-cycle LR: cosine from ``lr_max/div`` up to ``lr_max`` over ``pct_start``,
    then cosine down to ``lr_max/div_final``.

    Examples:
        >>> sched = one_cycle_lr(1e-2, pct_start=0.5, div=10.0, div_final=100.0)
        >>> [round(float(sched(p)), 6) for p in (0.0, 0.5, 1.0)]
        [0.001, 0.01, 0.0001]
    """
    lr_max = np.asarray(lr_max, dtype=float)
    return combine_scheds(
        [pct_start, 1 - pct_start],
        [
            lambda p: sched_cos(lr_max / div, lr_max, p),
            lambda p: sched_cos(lr_max, lr_max / div_final, p),
        ],
    )


def one_cycle_mom(moms: Sequence[float] = DEFAULT_MOMS, pct_start: float = 0.25) -> Schedule:
    """fastai's one-cycle momentum: cosine ``moms[0] -> moms[1]`` over ``pct_start``, then
    ``moms[1] -> moms[2]``."""
    return combine_scheds(
        [pct_start, 1 - pct_start],
        [
            lambda p: sched_cos(moms[0], moms[1], p),
            lambda p: sched_cos(moms[1], moms[2], p),
        ],
    )


def flat_cos_lr(lr: Value, pct_start: float = 0.75, div_final: float = 1e5) -> Schedule:
    """fastai's flat-cosine LR: ``lr`` for ``pct_start`` of the steps, then cosine down to
    ``lr/div_final``."""
    lr = np.asarray(lr, dtype=float)
    return combine_scheds(
        [pct_start, 1 - pct_start],
        [sched_const(lr), lambda p: sched_cos(lr, lr / div_final, p)],
    )


def exp_range(start: Value, end: Value) -> Schedule:
    """The LR range test's sweep: ``start * (end/start) ** pct`` (element-wise for arrays)."""
    start = np.asarray(start, dtype=float)
    end = np.asarray(end, dtype=float)
    return lambda pct: sched_exp(start, end, pct)


def steps_per_epoch(n_batches: int, accumulate_grad_batches: int = 1) -> int:
    """Optimizer steps in an epoch of ``n_batches`` batches (Lightning steps once more for a
    last, partial accumulation). The stage callback, the previews and the checkpoints all count with it.

    Examples:
        >>> steps_per_epoch(10, 4)
        3
    """
    return max(1, math.ceil(n_batches / accumulate_grad_batches))


def values_at(
    lr_sched: Schedule,
    mom_sched: Schedule | None,
    step: int,
    total_steps: int,
    n_groups: int,
    anneal: Anneal | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The LRs and momentums (one per layer group) of optimizer step ``step`` (0-based) of a fit
    of ``total_steps`` steps: ``pct = step / total_steps``; steps past the end keep the final value.
    From the start of ``anneal`` (a plateau's tail) on, ``pct`` is its remapped position
    (`difflr.policy.plateau.scheduled_pct`).

    Examples:
        >>> values_at(sched_const(0.1), None, 3, 4, 2)
        (array([0.1, 0.1]), None)
    """
    pct = scheduled_pct(step, total_steps, anneal)
    lrs = np.broadcast_to(np.asarray(lr_sched(pct), dtype=float), (n_groups,))
    if mom_sched is None:
        return lrs, None
    return lrs, np.broadcast_to(np.asarray(mom_sched(pct), dtype=float), (n_groups,))


def sample(
    lr_sched: Schedule,
    mom_sched: Schedule | None,
    total_steps: int,
    n_groups: int,
    anneal: Anneal | None = None,
    n_steps: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Every step's values of a fit of ``total_steps`` steps, as `values_at` gives them (what
    training uses): ``(lrs, moms)`` of shape ``(total_steps, n_groups)``, ``moms`` ``None`` when
    the schedule leaves momentum alone. With a plateau's ``anneal``, the first ``n_steps`` steps
    (those the stage runs)."""
    steps = [
        values_at(lr_sched, mom_sched, i, total_steps, n_groups, anneal)
        for i in range(total_steps if n_steps is None else n_steps)
    ]
    lrs = np.array([s[0] for s in steps])
    return lrs, None if mom_sched is None else np.array([s[1] for s in steps])
