"""Argument checks for the public entry points: one vocabulary for every module.

A value of the wrong type raises ``TypeError``; a value of the right type that is out of range
raises ``ValueError``. Every message names the argument, the value received and what to pass
instead. Each check returns the value in its normal form (``int``, ``float``, a tuple) so a caller
validates and converts in one line.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor

__all__ = [
    "check_callable",
    "check_choice",
    "check_int",
    "check_moms",
    "check_number",
    "check_pct",
    "check_positive",
    "check_wd",
    "is_int",
    "is_number",
    "non_finite_names",
    "user_stacklevel",
]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (numpy's included), and not a ``bool``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any, *, tensor: bool = False) -> bool:
    """Whether ``value`` is a real number (numpy's included), and not a ``bool``; with
    ``tensor=True`` a real tensor of one element counts too (what a metric may return).

    Examples:
        >>> is_number(0.5), is_number(True), is_number(torch.tensor([0.5]), tensor=True)
        (True, False, True)
    """
    if isinstance(value, torch.Tensor):
        return tensor and value.numel() == 1 and not value.is_complex()
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, complex))


def check_int(value: Any, name: str, low: int = 0, *, what: str = "") -> int:
    """``value`` as an ``int`` if it is an integer ``>= low``.

    Args:
        value: What the user passed.
        name: The argument's name in messages.
        low: Smallest accepted value.
        what: What the number counts, for the message (``"a number of epochs"``).

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value < low``.

    Examples:
        >>> check_int(3, "n_epoch", 1)
        3
    """
    note = f" ({what})" if what else ""
    if not is_int(value):
        raise TypeError(
            f"{name} must be an int{note}, got {value!r} ({type(value).__name__}); "
            f"e.g. {name}={max(low, 1)}."
        )
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}{note}, got {value!r}.")
    return int(value)


def check_number(
    value: Any,
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    open_low: bool = True,
    open_high: bool = True,
    what: str = "",
    example: str = "",
) -> float:
    """``value`` as a ``float`` if it is a finite number in the interval.

    Args:
        value: What the user passed.
        name: The argument's name in messages.
        low: The interval's lower bound.
        high: The interval's upper bound.
        open_low: Whether ``low`` itself is excluded.
        open_high: Whether ``high`` itself is excluded.
        what: What the number means, for the message (``"weight decay"``).
        example: A good value, shown in the message (``"0.25"``).

    Raises:
        TypeError: ``value`` is not a number.
        ValueError: ``value`` is NaN, infinite or outside the interval.

    Examples:
        >>> check_number(0.3, "pct_start", 0, 1)
        0.3
    """
    note = f" ({what})" if what else ""
    hint = f"; e.g. {name}={example}" if example else ""
    if not is_number(value):
        raise TypeError(
            f"{name} must be a number{note}, got {value!r} ({type(value).__name__}){hint}."
        )
    inside = (value > low if open_low else value >= low) and (
        value < high if open_high else value <= high
    )
    if not (math.isfinite(value) and inside):
        if math.isfinite(low) and math.isfinite(high):
            left, right = "(" if open_low else "[", ")" if open_high else "]"
            where = f"in {left}{low:g}, {high:g}{right}"
        elif math.isfinite(low):
            where = f"a finite number {'>' if open_low else '>='} {low:g}"
        else:
            where = f"a finite number {'<' if open_high else '<='} {high:g}"
        raise ValueError(f"{name} must be {where}{note}, got {value!r}{hint}.")
    return float(value)


def check_positive(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite number ``> 0``."""
    return check_number(value, name, 0)


def check_pct(value: Any, name: str = "pct_start") -> float:
    """A fraction of a fit's steps, in (0, 1)."""
    return check_number(
        value, name, 0, 1, what="the fraction of steps spent warming up", example="0.25"
    )


def check_moms(moms: Any, name: str = "moms") -> tuple[float, float, float]:
    """Three momentums ``(start, middle, end)``, each in [0, 1).

    Raises:
        TypeError: ``moms`` is not a sequence of three numbers.
        ValueError: A value is outside [0, 1).
    """
    message = (
        f"{name} must be three values (start, middle, end) in [0, 1), got {moms!r}; e.g. "
        "(0.95, 0.85, 0.95)."
    )
    if isinstance(moms, (str, bytes)) or not hasattr(moms, "__iter__"):
        raise TypeError(message)
    values = tuple(moms)
    if not all(is_number(m) for m in values):
        raise TypeError(message)
    if len(values) != 3 or not all(0 <= m < 1 for m in values):
        raise ValueError(message)
    return tuple(float(m) for m in values)  # type: ignore[return-value]


def check_wd(wd: Any) -> float | None:
    """A weight decay ``>= 0``, or ``None`` (keep the current one)."""
    if wd is None:
        return None
    return check_number(wd, "wd", 0, open_low=False, what="weight decay", example="0.01")


def check_callable(value: Any, name: str, signature: str) -> None:
    """Raise ``TypeError`` unless ``value`` is callable; ``signature`` says how it is called."""
    if not callable(value):
        raise TypeError(f"{name} must be callable as {signature}, got {value!r}.")


def check_choice(value: Any, name: str, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    if value not in choices:
        listed = [repr(c) for c in choices]
        either = " or ".join([", ".join(listed[:-1]), listed[-1]] if len(listed) > 1 else listed)
        raise ValueError(f"{name} must be {either}, got {value!r}.")
    return value


def non_finite_names(named_tensors: Iterable[tuple[str, Any]], limit: int = 5) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity (at most
    ``limit``), e.g. ``model.named_parameters()`` or a state dict's ``items()``; of a sharded
    (``DTensor``) tensor, this process's shard only."""
    found = []
    for name, tensor in named_tensors:
        # A sharded (DTensor) parameter: this rank's shard, without a collective per tensor.
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())
        ):
            found.append(name)
            if len(found) >= limit:
                break
    return found


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line: the first frame outside
    difflr (and outside ``contextlib``, whose frames sit between a context manager and its
    caller), however deep in difflr the warning is raised. Use it in the ``warnings.warn`` call."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
        "difflr",
        "contextlib",
    ):
        frame = frame.f_back
        level += 1
    return level
