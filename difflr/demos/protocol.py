"""The main job's protocol: which images choose the hyper-parameters, which measure, how a draw is
taken, the shifted test sets, and the paired statistics.

The 1,797 UCI digits are split once, class by class with a fixed seed, into a *selection pool*
(a third) and an *evaluation pool* (the rest). Every hyper-parameter of the main job (each
recipe's LR, the long scratch budget, the baselines' regularisation) is chosen on draws from the
selection pool; every number in the results table comes from draws from the evaluation pool. A
draw takes ``shots`` images of each class of one pool to train on and tests on every other image
of the same pool, so no image a reported number is measured on ever took part in a choice.

Public API:

- `split_pools`, `Pools`: the fixed split.
- `draw_from_pool`, `Draw`: one draw of labelled images inside a pool.
- `shifted_inputs`, `SHIFTS`: the test images under a shift the training never saw.
- `paired_interval`: the mean paired difference over draws with its 95% t-interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from difflr.demos.digits import MAX_LEVEL, draw_shots, to_input

__all__ = [
    "SELECTION_SHARE",
    "SHIFTS",
    "SPLIT_SEED",
    "Draw",
    "Pools",
    "draw_from_pool",
    "paired_interval",
    "shifted_inputs",
    "split_pools",
]

#: Seed of the split into the selection and the evaluation pool (fixed: the split is part of the
#: protocol, not of a run).
SPLIT_SEED = 1797
#: Share of each class that goes to the selection pool (the rest is the evaluation pool).
SELECTION_SHARE = 1 / 3

#: The shifted test sets: what each does to a test image (fixed per image by ``seed``).
#: ``rotated``: a rotation of 15 to 30 degrees either way and a shear of up to 0.3 (training
#: augments by at most 10 degrees and no shear); ``noisy``: Gaussian noise of 4 grey levels
#: (a quarter of the range) on every pixel, clipped to 0..16 (nothing like it in the source or
#: the augmentation).
SHIFTS: dict[str, str] = {
    "rotated": "rotated 15-30 degrees either way and sheared by up to 0.3",
    "noisy": "Gaussian noise of 4 grey levels (of 16) on every pixel, clipped",
}
_ROTATION = (15.0, 30.0)  # degrees
_SHEAR = 0.3
_NOISE = 4.0  # grey levels


@dataclass(frozen=True)
class Pools:
    """Two disjoint sets of image indices (ascending) that together hold every image."""

    selection: torch.Tensor
    evaluation: torch.Tensor

    def as_dict(self) -> dict[str, Any]:
        """Plain values for ``results.json``."""
        return {
            "seed": SPLIT_SEED,
            "selection_share": SELECTION_SHARE,
            "selection": self.selection.tolist(),
            "evaluation": self.evaluation.tolist(),
        }


def split_pools(
    labels: torch.Tensor, share: float = SELECTION_SHARE, seed: int = SPLIT_SEED
) -> Pools:
    """Split the images class by class: ``round(share * n)`` of each class's ``n`` images, at
    random, to the selection pool; the others to the evaluation pool.

    Args:
        labels: ``(n,)`` class indices ``0..k-1``.
        share: Share of each class for the selection pool, in (0, 1).
        seed: Seed of the split.

    Returns:
        The two pools, each ascending.

    Examples:
        >>> pools = split_pools(torch.tensor([0, 0, 0, 1, 1, 1]))
        >>> len(pools.selection), len(pools.evaluation)
        (2, 4)
    """
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}.")
    generator = torch.Generator().manual_seed(seed)
    selection = []
    for label in range(int(labels.max()) + 1):
        members = torch.where(labels == label)[0]
        order = torch.randperm(len(members), generator=generator)
        selection.append(members[order[: round(share * len(members))]])
    chosen = torch.zeros(len(labels), dtype=torch.bool)
    chosen[torch.cat(selection)] = True
    return Pools(torch.where(chosen)[0], torch.where(~chosen)[0])


@dataclass(frozen=True)
class Draw:
    """One draw inside a pool: the labelled images to train on and the pool's others to test on
    (indices into the whole dataset)."""

    train: torch.Tensor
    test: torch.Tensor


def draw_from_pool(
    labels: torch.Tensor, pool: torch.Tensor, shots: int, generator: torch.Generator
) -> Draw:
    """``shots`` random images of each class of ``pool``, and the pool's other images.

    Raises:
        ValueError: A class of the pool has no more than ``shots`` images.
    """
    train, test = draw_shots(labels[pool], shots, generator)
    return Draw(pool[train], pool[test])


def shifted_inputs(levels: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """The network inputs of ``levels`` under the shift ``kind`` (a key of `SHIFTS`); the same
    ``seed`` gives the same shift of each image.

    Examples:
        >>> levels = torch.zeros(3, 8, 8)
        >>> torch.equal(shifted_inputs(levels, "noisy", 1), shifted_inputs(levels, "noisy", 1))
        True
    """
    generator = torch.Generator().manual_seed(seed)
    n = len(levels)
    if kind == "rotated":
        low, high = (math.radians(a) for a in _ROTATION)
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        angle = sign * (low + torch.rand(n, generator=generator) * (high - low))
        shear = (torch.rand(n, generator=generator) * 2 - 1) * _SHEAR
        rotation = torch.zeros(n, 2, 2)
        rotation[:, 0, 0], rotation[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        rotation[:, 1, 0], rotation[:, 1, 1] = torch.sin(angle), torch.cos(angle)
        shearing = torch.eye(2).repeat(n, 1, 1)
        shearing[:, 0, 1] = shear
        theta = torch.zeros(n, 2, 3)
        theta[:, :, :2] = rotation @ shearing
        return to_input(levels, theta)
    if kind == "noisy":
        noise = torch.randn(levels.shape, generator=generator) * _NOISE
        return to_input((levels.float() + noise).clamp(0, MAX_LEVEL))
    raise ValueError(f"unknown shift {kind!r}; the shifts are {', '.join(SHIFTS)}.")


def paired_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> dict[str, float]:
    """Mean of the paired differences ``a[i] - b[i]`` over draws and its t-interval.

    Args:
        a, b: One value per draw, the same draws in the same order.
        confidence: Coverage of the interval.

    Returns:
        ``{"mean", "low", "high", "n"}``; the bounds are NaN with fewer than 2 draws.

    Examples:
        >>> interval = paired_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
        >>> round(interval["low"], 3), round(interval["high"], 3)
        (-0.484, 4.484)
    """
    from scipy import stats  # scikit-learn's dependency, like the digits themselves

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.shape != (len(a),) or len(a) != len(b):
        raise ValueError(
            f"a and b must be two sequences of one value per draw; got {len(a)} and {len(b)}."
        )
    mean = float(diff.mean())
    if len(diff) < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": len(diff)}
    half = float(stats.t.ppf((1 + confidence) / 2, len(diff) - 1)) * float(
        diff.std(ddof=1) / math.sqrt(len(diff))
    )
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(diff)}
