"""Learning-rate specs: one value per layer group from a float, a list or a ``slice``.

fastai's semantics, with stricter errors:

=====================  ===================================================================
spec                   value for group ``i`` of ``N``
=====================  ===================================================================
``1e-3`` or ``[1e-3]`` ``1e-3`` for every group
``[a, b, ..., z]``     as given (exactly ``N`` values)
``slice(hi)``          ``hi / 10`` for every group but the last, ``hi`` for the last
``slice(lo, hi)``      ``lo * (hi / lo) ** (i / (N - 1))``: geometric from stem to head
``layer_decay(hi, d)`` ``hi * d ** (N - 1 - i)``: ``hi`` at the head, times ``d`` per group
                       towards the stem (timm's and BEiT's layer-wise LR decay)
=====================  ===================================================================

Layer-wise LR decay is the discriminative LR of the transformer literature, said the other way
round: ``layer_decay(hi, d)`` over ``N`` groups *is* ``slice(hi * d ** (N - 1), hi)``, whose
geometric spacing multiplies the LR by ``1 / d`` from one group to the next. Say it with the
decay when you think per layer ("0.75 per layer"), with the slice when you think of the range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from difflr.utils.checks import check_int, check_number, is_number

__all__ = [
    "FLOAT32_MAX",
    "LRSpec",
    "LayerDecay",
    "expand_lrs",
    "layer_decay",
]

LRSpec: TypeAlias = "float | Sequence[float] | np.ndarray | slice | LayerDecay"


@dataclass(frozen=True)
class LayerDecay:
    """An LR spec: ``hi`` for the last layer group (the head), multiplied by ``decay`` for each
    group towards the first (the embeddings or the stem). Made by `layer_decay`.

    Attributes:
        hi: The head's learning rate (> 0).
        decay: The factor from one group to the one before it, in (0, 1].
    """

    hi: float
    decay: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "hi", check_number(self.hi, "hi", 0, what="the head's LR"))
        decay = check_number(
            self.decay,
            "decay",
            0,
            1,
            open_high=False,
            what="the LR factor per layer group",
            example="0.75",
        )
        object.__setattr__(self, "decay", decay)

    def expand(self, n_groups: int) -> list[float]:
        """One LR per group: ``hi * decay ** (n_groups - 1 - i)`` for group ``i``."""
        check_int(n_groups, "n_groups", 1, what="a number of layer groups")
        return [self.hi * self.decay ** (n_groups - 1 - i) for i in range(n_groups)]

    def as_slice(self, n_groups: int) -> slice:
        """The ``slice(lo, hi)`` that gives the same LRs over ``n_groups`` groups."""
        check_int(n_groups, "n_groups", 1, what="a number of layer groups")
        return slice(self.hi * self.decay ** (n_groups - 1), self.hi)

    def __repr__(self) -> str:
        return f"layer_decay({self.hi!r}, {self.decay!r})"


def layer_decay(hi: float, decay: float) -> LayerDecay:
    """Layer-wise LR decay as an LR spec: ``hi`` at the head, times ``decay`` per group towards
    the embeddings (timm's ``layer_decay``, BEiT's and ELECTRA's fine-tuning recipe).

    Usable wherever an LR spec is (``fit_one_cycle(n, lr_max=layer_decay(1e-3, 0.75))``,
    ``Learner(lr=...)``, ``Stage``, ``lr_find``'s bounds). Over ``N`` groups it equals
    ``slice(hi * decay ** (N - 1), hi)``; with one group per transformer layer plus the
    embeddings and the head (what difflr finds for a Hugging Face model), it gives each layer
    timm's per-layer scale ``decay ** (N - 1 - i)``.

    Args:
        hi: The head's learning rate (> 0).
        decay: Factor per group, in (0, 1]; 1 gives every group ``hi``.

    Raises:
        TypeError: ``hi`` or ``decay`` is not a number.
        ValueError: ``hi <= 0``, or ``decay`` is outside (0, 1].

    Examples:
        >>> expand_lrs(layer_decay(1e-3, 0.5), 4)
        [0.000125, 0.00025, 0.0005, 0.001]
        >>> layer_decay(1e-3, 0.5).as_slice(4)
        slice(0.000125, 0.001, None)
    """
    return LayerDecay(hi, decay)


#: The largest finite float32: an LR above it overflows in the optimizer's arithmetic.
FLOAT32_MAX = 3.4028234663852886e38

_FIX = "pass a positive float, a slice(lo, hi) with 0 < lo <= hi, or {n} positive values"


def _check_value(value: object, name: str, n_groups: int, allow_zero: bool) -> float:
    if not is_number(value):
        raise TypeError(
            f"{name} must be a number, got {value!r} ({type(value).__name__}); "
            + _FIX.format(n=n_groups)
            + "."
        )
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"{name} is {value!r}; learning rates must be finite and "
            f"{'non-negative' if allow_zero else 'positive'}: " + _FIX.format(n=n_groups) + "."
        )
    if value > FLOAT32_MAX:
        raise ValueError(
            f"{name} is {value!r}, more than a float32 parameter can be stepped by (about 3.4e38); "
            + _FIX.format(n=n_groups)
            + " (learning rates are usually between 1e-6 and 1)."
        )
    return value


def expand_lrs(
    spec: LRSpec, n_groups: int, *, name: str = "lr", allow_zero: bool = False
) -> list[float]:
    """Expand an LR spec into one learning rate per layer group.

    Args:
        spec: A float, a sequence of one or ``n_groups`` floats, a ``slice``
            (``slice(hi)`` or ``slice(lo, hi)``) or a `layer_decay`; see the module docstring.
        n_groups: Number of layer groups, frozen ones included (N >= 1).
        name: The argument's name, used in error messages.
        allow_zero: Accept 0 in a list (the original milestone plans give frozen groups 0).

    Returns:
        ``n_groups`` floats, stem first.

    Raises:
        ValueError: A value is negative, zero, NaN or infinite; ``slice(lo, hi)`` has
            ``lo > hi`` or ``lo == 0``; a list has neither 1 nor ``n_groups`` values; a slice
            has a step.
        TypeError: ``spec`` is not a number, a sequence of numbers or a slice.

    Examples:
        >>> expand_lrs(slice(1e-5, 1e-3), 3)
        [1e-05, 0.0001, 0.001]
        >>> expand_lrs(slice(1e-3), 3)
        [0.0001, 0.0001, 0.001]
    """
    check_int(n_groups, "n_groups", 1, what="a number of layer groups")
    if isinstance(spec, LayerDecay):
        return spec.expand(n_groups)
    if isinstance(spec, slice):
        return _expand_slice(spec, n_groups, name)
    if isinstance(spec, (Sequence, np.ndarray)) and not isinstance(spec, (str, bytes)):
        values = (
            list(np.asarray(spec, dtype=object).ravel())
            if isinstance(spec, np.ndarray)
            else list(spec)
        )
        if len(values) == 1:
            values = values * n_groups
        if len(values) != n_groups:
            raise ValueError(
                f"{name} has {len(values)} values but the model has {n_groups} layer groups; "
                f"pass a float, a slice(lo, hi) or {n_groups} values."
            )
        return [_check_value(v, f"{name}[{i}]", n_groups, allow_zero) for i, v in enumerate(values)]
    return [_check_value(spec, name, n_groups, allow_zero=False)] * n_groups


def _expand_slice(spec: slice, n_groups: int, name: str) -> list[float]:
    if spec.step is not None:
        raise ValueError(
            f"{name}={spec!r} has a step; use slice(hi) or slice(lo, hi) (the spacing between "
            "groups is always geometric)."
        )
    if spec.stop is None:
        raise ValueError(f"{name}={spec!r} has no upper bound; use slice(hi) or slice(lo, hi).")
    hi = _check_value(spec.stop, f"{name}.stop", n_groups, allow_zero=False)
    if spec.start is None:
        return [hi / 10] * (n_groups - 1) + [hi]
    if isinstance(spec.start, (int, float, np.number)) and spec.start == 0:
        raise ValueError(
            f"{name}={spec!r} starts at 0, which geometric spacing cannot reach; use a small "
            f"positive lower bound such as slice({hi / 100:g}, {hi:g})."
        )
    lo = _check_value(spec.start, f"{name}.start", n_groups, allow_zero=False)
    if lo > hi:
        raise ValueError(
            f"{name}={spec!r} has lo > hi; the stem gets lo and the head hi: use "
            f"slice({hi:g}, {lo:g})."
        )
    if n_groups == 1:
        return [hi]
    return [float(v) for v in lo * (hi / lo) ** (np.arange(n_groups) / (n_groups - 1))]
