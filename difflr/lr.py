"""Learning-rate specs: one value per layer group from a float, a list or a ``slice``.

fastai's semantics, with stricter errors:

=====================  ===================================================================
spec                   value for group ``i`` of ``N``
=====================  ===================================================================
``1e-3`` or ``[1e-3]`` ``1e-3`` for every group
``[a, b, ..., z]``     as given (exactly ``N`` values)
``slice(hi)``          ``hi / 10`` for every group but the last, ``hi`` for the last
``slice(lo, hi)``      ``lo * (hi / lo) ** (i / (N - 1))``: geometric from stem to head
=====================  ===================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np

from difflr.checks import check_int, is_number

LRSpec: TypeAlias = "float | Sequence[float] | np.ndarray | slice"

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
        spec: A float, a sequence of one or ``n_groups`` floats, or a ``slice``
            (``slice(hi)`` or ``slice(lo, hi)``); see the module docstring.
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
