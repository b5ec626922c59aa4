"""Argument checks shared by the public entry points: each names the value and the fix."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def check_epochs(n_epoch: Any, name: str = "n_epoch") -> None:
    if isinstance(n_epoch, bool) or not isinstance(n_epoch, (int, np.integer)) or n_epoch < 1:
        raise ValueError(f"{name} must be an int >= 1 (a number of epochs), got {n_epoch!r}.")


def check_positive(value: Any, name: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.number))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def check_pct(pct_start: Any) -> None:
    if (
        isinstance(pct_start, bool)
        or not isinstance(pct_start, (int, float, np.number))
        or not 0 < pct_start < 1
    ):
        raise ValueError(
            f"pct_start must be in (0, 1) (the fraction of steps spent warming up), got "
            f"{pct_start!r}; e.g. 0.25."
        )


def check_moms(moms: Any, name: str = "moms") -> tuple[float, float, float]:
    try:
        values = tuple(float(m) for m in moms)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(0 <= m < 1 for m in values):
        raise ValueError(
            f"{name} must be three values (start, middle, end) in [0, 1), got {moms!r}; e.g. "
            "(0.95, 0.85, 0.95)."
        )
    return values  # type: ignore[return-value]


def check_wd(wd: Any) -> float | None:
    if wd is None:
        return None
    if isinstance(wd, bool) or not isinstance(wd, (int, float, np.number)) or not wd >= 0:
        raise ValueError(f"wd must be a number >= 0 (weight decay), got {wd!r}.")
    return float(wd)


def check_number(
    value: Any,
    name: str,
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = True,
    open_high: bool = True,
) -> float:
    """Return ``value`` as a float if it lies in the interval, else raise a ValueError naming it."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.number))
        and math.isfinite(value)
        and (value > low if open_low else value >= low)
        and (value < high if open_high else value <= high)
    )
    if not ok:
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}.")
    return float(value)
