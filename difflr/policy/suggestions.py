"""Suggestion functions: read a learning rate off an LR range test's loss-vs-LR curve.

A suggestion function takes the learning rates of a sweep (strictly increasing, > 0) and the loss
at each, and returns one learning rate as a python float. The four built-in ones reproduce
fastai's algorithms (``fastai/callback/schedule.py``, fastai 2.7) and are safe on awkward curves:

- Points whose loss is not finite (NaN, ±inf: a diverged sweep) are dropped before computing.
- Fewer than 2 finite points, or ``lrs`` and ``losses`` of different lengths, raise a
  ``ValueError`` that names the lengths.
- When the loss never decreases from one point to the next (a flat or rising curve holds no
  information about a good LR), every function returns ``lrs[0]``, the smallest LR swept: the
  most cautious choice.

``make_suggestions`` applies several functions the way ``lr_find`` does and returns a
`SuggestedLRs` namedtuple with one field per function, plus the points a plot marks.
"""

from __future__ import annotations

import functools
import keyword
import math
import warnings
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from difflr.utils.checks import check_int, check_number, check_positive, user_stacklevel

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = [
    "SuggestedLRs",
    "SuggestionFunc",
    "make_suggestions",
    "minimum",
    "slide",
    "steep",
    "suggestion_funcs",
    "suggestion_name",
    "valley",
]

#: ``func(lrs, losses) -> lr``: reads one learning rate off a sweep's curve.
SuggestionFunc: TypeAlias = "Callable[[np.ndarray, np.ndarray], float]"


# --------------------------------------------------------------------------------------------
# Input checks shared by the suggestion functions
# --------------------------------------------------------------------------------------------


def _as_1d(values: ArrayLike, name: str) -> np.ndarray:
    """Return ``values`` as a 1-D float64 array, or raise naming ``name``."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be a sequence of numbers; got {type(values).__name__}: {error}"
        ) from error
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one value per sweep iteration); got shape {array.shape}. "
            "Pass the curve of a single param group, e.g. lrs[:, -1]."
        )
    return array


def _check_lrs(lrs: np.ndarray) -> None:
    """Raise unless ``lrs`` is finite, > 0 and strictly increasing, as a sweep records them."""
    bad = np.flatnonzero(~np.isfinite(lrs) | (lrs <= 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"lrs must be finite and > 0 (they are read on a log scale); got lrs[{i}] = {lrs[i]}."
        )
    not_increasing = np.flatnonzero(np.diff(lrs) <= 0)
    if not_increasing.size:
        i = int(not_increasing[0]) + 1
        raise ValueError(
            f"lrs must be strictly increasing, as an LR sweep records them; got "
            f"lrs[{i}] = {lrs[i]} after lrs[{i - 1}] = {lrs[i - 1]}. Sort the points by LR."
        )


def _check_lengths(lrs: np.ndarray, losses: np.ndarray) -> None:
    if len(lrs) != len(losses):
        raise ValueError(
            f"lrs has {len(lrs)} values but losses has {len(losses)}; pass one loss per "
            "learning rate."
        )


def _curve(lrs: ArrayLike, losses: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate a sweep's curve and return it without the points whose loss is not finite."""
    lr_array, loss_array = _as_1d(lrs, "lrs"), _as_1d(losses, "losses")
    _check_lengths(lr_array, loss_array)
    _check_lrs(lr_array)
    finite = np.isfinite(loss_array)
    n_finite = int(finite.sum())
    if n_finite < 2:
        raise ValueError(
            f"a suggestion needs at least 2 points with a finite loss; got {n_finite} "
            f"(lrs has {len(lr_array)} values, losses has {len(loss_array)}). Run a longer "
            "sweep (num_it) or lower end_lr so that the loss does not diverge at once."
        )
    return lr_array[finite], loss_array[finite]


def _never_decreases(losses: np.ndarray) -> bool:
    return not bool(np.any(np.diff(losses) < 0))


# --------------------------------------------------------------------------------------------
# Suggestion functions (fastai's algorithms)
# --------------------------------------------------------------------------------------------


def valley(lrs: ArrayLike, losses: ArrayLike) -> float:
    """Suggest an LR about halfway down the longest valley of the loss curve (fastai's default).

    The "valley" is the longest strictly decreasing *subsequence* of the losses (found by the
    O(n²) dynamic programme fastai uses; it may skip over bumps of a noisy curve). With ``end``
    the index where it ends and ``length`` its number of points, fastai takes
    ``start = end - length`` and returns the LR at
    ``start + int((end - start) / 3) + int((end - start) / 3 / 2)``, i.e. about 1/3 + 1/6 = 1/2
    of the way down. Unlike fastai, an index below 0 (a 2-point valley starting at the first
    point) is clamped to 0 instead of wrapping round to the last point.

    Args:
        lrs: Learning rates of the sweep, strictly increasing, > 0.
        losses: Loss at each LR; points with a non-finite loss are dropped.

    Returns:
        The suggested learning rate; ``lrs[0]`` when the loss never decreases.

    Raises:
        ValueError: If the lengths differ, fewer than 2 losses are finite, or ``lrs`` is not
            positive and strictly increasing.

    Examples:
        >>> lrs = [10.0**e for e in range(-7, 1)]  # 1e-07 ... 1.0
        >>> valley(lrs, [2.0, 2.0, 1.9, 1.5, 1.0, 0.6, 0.5, 4.0])  # 6 points down to index 6
        0.0001
    """
    lr_array, loss_array = _curve(lrs, losses)
    return float(lr_array[_valley_index(loss_array)])


def _valley_index(losses: np.ndarray) -> int:
    n = len(losses)
    # decreasing_len[i]: length of the longest strictly decreasing subsequence ending at i.
    decreasing_len = np.ones(n, dtype=np.int64)
    for i in range(1, n):
        higher_before = losses[:i] > losses[i]
        if higher_before.any():
            decreasing_len[i] = decreasing_len[:i][higher_before].max() + 1
    if decreasing_len.max() == 1:
        return 0  # nothing decreases; fastai's loop then leaves start = end = 0 as well
    # fastai keeps the first index that reaches the longest length (it updates on ">").
    end = int(np.argmax(decreasing_len))
    start = end - int(decreasing_len[end])  # one before a contiguous run's first point
    sections = (end - start) / 3
    index = start + int(sections) + int(sections / 2)
    return max(index, 0)


def slide(
    lrs: ArrayLike,
    losses: ArrayLike,
    lr_diff: int = 15,
    thresh: float = 0.005,
    adjust_value: float = 1.0,
) -> float:
    """Suggest an LR by sliding a window leftwards until the loss gradient is alike at both ends.

    fastai's "interval slide rule": with the gradient of the loss taken per point
    (``np.gradient(losses)``, in loss units per sweep iteration), a window ``lr_diff`` points
    wide starts at the right end of the curve and moves left one point at a time while the
    gradients at its two ends differ by more than ``thresh``. The suggestion is the LR at the
    window's left end of the last move (so one point right of the window where it stopped), or
    at the first window's left end when that one already satisfies the rule; it is then
    multiplied by ``adjust_value``. ``thresh`` is absolute, so it depends on the scale of the
    loss. On a curve of ``lr_diff`` points or fewer the window shrinks to the whole curve, which
    gives ``lrs[0] * adjust_value`` (fastai raises an ``IndexError`` there).

    Args:
        lrs: Learning rates of the sweep, strictly increasing, > 0.
        losses: Loss at each LR; points with a non-finite loss are dropped.
        lr_diff: Width of the window in points, >= 1.
        thresh: Largest difference of the two gradients that stops the slide, >= 0.
        adjust_value: Factor applied to the LR found, > 0.

    Returns:
        The suggested learning rate; ``lrs[0]`` when the loss never decreases.

    Raises:
        ValueError: If the lengths differ, fewer than 2 losses are finite, ``lrs`` is not
            positive and strictly increasing, or a parameter is out of range.

    Examples:
        >>> lrs = [10.0**e for e in range(-6, 1)]
        >>> slide(lrs, [3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0], lr_diff=3)  # a straight line
        0.001
    """
    check_int(lr_diff, "lr_diff", 1, what="points")
    check_number(thresh, "thresh", 0, open_low=False)
    check_positive(adjust_value, "adjust_value")
    lr_array, loss_array = _curve(lrs, losses)
    if _never_decreases(loss_array):
        return float(lr_array[0])
    n = len(loss_array)
    gradient = np.gradient(loss_array)
    right = n - 1
    left = right - min(int(lr_diff), n - 1)
    suggestion_index = left
    while left >= 0 and abs(gradient[right] - gradient[left]) > thresh:
        suggestion_index = left
        right -= 1
        left -= 1
    return float(lr_array[suggestion_index]) * adjust_value


def minimum(lrs: ArrayLike, losses: ArrayLike) -> float:
    """Suggest one tenth of the LR at which the loss is lowest.

    Args:
        lrs: Learning rates of the sweep, strictly increasing, > 0.
        losses: Loss at each LR; points with a non-finite loss are dropped.

    Returns:
        ``lr_at_min_loss / 10`` (the first minimum on ties); ``lrs[0]`` when the loss never
        decreases.

    Raises:
        ValueError: If the lengths differ, fewer than 2 losses are finite, or ``lrs`` is not
            positive and strictly increasing.

    Examples:
        >>> minimum([1e-4, 1e-3, 1e-2, 1e-1], [1.0, 0.5, 0.2, 0.9])
        0.001
    """
    lr_array, loss_array = _curve(lrs, losses)
    if _never_decreases(loss_array):
        return float(lr_array[0])
    return float(lr_array[int(np.argmin(loss_array))]) / 10


def steep(lrs: ArrayLike, losses: ArrayLike) -> float:
    """Suggest the LR where the loss falls fastest against log(LR).

    The slope of each segment between consecutive points is
    ``(loss[i+1] - loss[i]) / (log10(lr[i+1]) - log10(lr[i]))``; as in fastai, the suggestion is
    the LR at the *left* end of the most negative segment (the first one on ties).

    Args:
        lrs: Learning rates of the sweep, strictly increasing, > 0.
        losses: Loss at each LR; points with a non-finite loss are dropped.

    Returns:
        The suggested learning rate; ``lrs[0]`` when the loss never decreases.

    Raises:
        ValueError: If the lengths differ, fewer than 2 losses are finite, or ``lrs`` is not
            positive and strictly increasing.

    Examples:
        >>> steep([1e-4, 1e-3, 1e-2, 1e-1], [1.0, 0.9, 0.3, 0.2])
        0.001
    """
    lr_array, loss_array = _curve(lrs, losses)
    if _never_decreases(loss_array):
        return float(lr_array[0])
    slopes = np.diff(loss_array) / np.diff(np.log10(lr_array))
    return float(lr_array[int(np.argmin(slopes))])


# --------------------------------------------------------------------------------------------
# The result of lr_find
# --------------------------------------------------------------------------------------------


class SuggestedLRs(tuple):
    """The learning rates ``lr_find`` suggests: a namedtuple with one field per suggestion function.

    Each result is an instance of a namedtuple class made for its field names (cached, so the
    same names give the same class) that also derives from this class: use ``SuggestedLRs`` in
    annotations and ``isinstance`` checks, and build one with `SuggestedLRs.from_dict`.
    Instances pickle and copy like plain tuples.

    Examples:
        >>> suggested = SuggestedLRs.from_dict({"valley": 1e-3, "steep": 3e-3})
        >>> suggested.valley
        0.001
        >>> suggested
        SuggestedLRs(valley=0.001, steep=0.003)
        >>> isinstance(suggested, SuggestedLRs), suggested._fields
        (True, ('valley', 'steep'))
    """

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> SuggestedLRs:
        """Build a result whose fields are the keys of ``values``, in order.

        Args:
            values: ``{name: lr}``; each name a valid identifier, not a keyword, not starting
                with an underscore.

        Returns:
            A `SuggestedLRs` instance.

        Raises:
            ValueError: If a name cannot be a field name.
        """
        return _suggested_lrs_class(tuple(values))(*(float(v) for v in values.values()))

    def __reduce__(self) -> tuple[Callable[..., SuggestedLRs], tuple[object, ...]]:
        # The namedtuple classes are made at run time; pickle them by their field names.
        return _rebuild_suggested_lrs, (tuple(self._fields), tuple(self))


@functools.cache
def _suggested_lrs_class(names: tuple[str, ...]) -> type[SuggestedLRs]:
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise ValueError(
                f"{name!r} cannot be a SuggestedLRs field; use an identifier that is not a "
                "keyword and does not start with an underscore."
            )
    fields = namedtuple("SuggestedLRs", names)  # the field names are only known at run time
    return type(
        "SuggestedLRs",
        (fields, SuggestedLRs),
        {"__slots__": (), "__module__": __name__, "__doc__": SuggestedLRs.__doc__},
    )


def _rebuild_suggested_lrs(names: tuple[str, ...], values: tuple[float, ...]) -> SuggestedLRs:
    return _suggested_lrs_class(names)(*values)


def suggestion_funcs(funcs: object) -> tuple[SuggestionFunc, ...]:
    """``funcs`` as a tuple of suggestion functions: ``lr_find`` and `make_suggestions` check
    their ``suggest_funcs`` here.

    Args:
        funcs: One suggestion function ``(lrs, losses) -> lr``, or a list or other iterable of
            them (empty: none).

    Raises:
        TypeError: ``funcs`` is neither a function nor an iterable of them (a string, a
            number), or one of its items is not callable.

    Examples:
        >>> [f.__name__ for f in suggestion_funcs(valley)], suggestion_funcs([])
        (['valley'], ())
    """
    if callable(funcs):
        return (funcs,)
    if isinstance(funcs, (str, bytes)) or not isinstance(funcs, Iterable):
        raise TypeError(
            f"suggest_funcs must be a suggestion function (lrs, losses) -> lr or a list of them; "
            f"got {funcs!r}."
        )
    func_tuple = tuple(funcs)
    for func in func_tuple:
        if not callable(func):
            raise TypeError(
                f"a suggestion function must be callable as func(lrs, losses); got {func!r}."
            )
    return func_tuple


def suggestion_name(func: Callable[..., object], position: int = 0) -> str:
    """The field name of a suggestion function in `SuggestedLRs`.

    Args:
        func: A suggestion function, possibly a ``functools.partial``.
        position: The function's position in ``suggest_funcs``, for functions whose name cannot
            be a field (a lambda becomes ``func0``, ``func1``, ...).

    Returns:
        ``func.__name__`` (of the wrapped function for a partial), else ``f"func{position}"``.

    Examples:
        >>> suggestion_name(valley), suggestion_name(lambda lrs, losses: 1e-3, 2)
        ('valley', 'func2')
    """
    target = func.func if isinstance(func, functools.partial) else func
    name = getattr(target, "__name__", "")
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
        return f"func{position}"
    return name


def make_suggestions(
    funcs: SuggestionFunc | Iterable[SuggestionFunc],
    lrs: ArrayLike,
    losses: ArrayLike,
    skip_start: int = 0,
    skip_end: int = 5,
) -> tuple[SuggestedLRs, dict[str, tuple[float, float]]]:
    """Apply suggestion functions to a sweep's curve the way ``lr_find`` does.

    Each function sees the curve without its first ``skip_start`` points (``lr_find`` uses
    ``num_it // 10``: the LR is still too small to move the loss), its last ``skip_end`` points
    (where it diverges) and the points whose loss is not finite. If fewer than 2 points remain,
    a warning says so and every suggestion is ``nan``.

    Each suggestion also comes with the point a plot marks: the suggested LR and the loss
    interpolated at it (linearly in log10(LR)) on the curve `difflr.plotting.plot_lr_find`
    draws, that is without the last ``skip_end`` points; the loss is the end value when the LR
    lies beyond the curve, and ``nan`` when the LR is not finite and > 0.

    Args:
        funcs: One suggestion function or several, e.g. ``(valley, steep)``. A field takes the
            function's ``__name__`` (see `suggestion_name`); a repeated name gets ``_<position>``
            appended.
        lrs: Learning rates of the sweep, strictly increasing, > 0.
        losses: Loss at each LR.
        skip_start: Points dropped at the start, >= 0.
        skip_end: Points dropped at the end, >= 0.

    Returns:
        ``(suggested, points)``: a `SuggestedLRs` with one float per function, and
        ``{name: (lr, loss)}`` in the same order, ready for ``plot_lr_find(suggestions=...)``.

    Raises:
        ValueError: If ``funcs`` is empty, the lengths differ, ``lrs`` is not positive and
            strictly increasing, or a skip count is negative.
        TypeError: If a function is not callable or returns something that is not a number.

    Examples:
        >>> lrs = [10.0**e for e in range(-6, 2)]  # 1e-06 ... 10.0
        >>> losses = [2.3, 2.3, 2.1, 1.6, 1.0, 0.8, 1.9, 9.0]
        >>> make_suggestions((minimum, steep), lrs, losses, skip_start=1, skip_end=1)
        (SuggestedLRs(minimum=0.01, steep=0.001), {'minimum': (0.01, 1.0), 'steep': (0.001, 1.6)})
    """
    func_tuple = suggestion_funcs(funcs)
    if not func_tuple:
        raise ValueError(
            "suggest_funcs is empty; pass at least one suggestion function, e.g. (valley,)."
        )
    check_int(skip_start, "skip_start", 0, what="points")
    check_int(skip_end, "skip_end", 0, what="points")

    lr_array, loss_array = _as_1d(lrs, "lrs"), _as_1d(losses, "losses")
    _check_lengths(lr_array, loss_array)
    _check_lrs(lr_array)
    names = _unique_names(func_tuple)

    stop = max(len(lr_array) - skip_end, 0)
    plotted_finite = np.isfinite(loss_array[:stop])
    plotted_lrs, plotted_losses = lr_array[:stop][plotted_finite], loss_array[:stop][plotted_finite]
    used = np.isfinite(loss_array[skip_start:stop])
    used_lrs, used_losses = lr_array[skip_start:stop][used], loss_array[skip_start:stop][used]

    if len(used_lrs) < 2:
        warnings.warn(
            f"lr_find recorded {len(lr_array)} points; {len(used_lrs)} remain with a finite loss "
            f"after dropping the first {skip_start} and the last {skip_end}, and a suggestion "
            "needs 2, so every suggestion is nan. Run more iterations (num_it) or lower end_lr.",
            stacklevel=user_stacklevel(),
        )
        suggested = SuggestedLRs.from_dict(dict.fromkeys(names, math.nan))
        return suggested, {name: (math.nan, math.nan) for name in names}

    values: dict[str, float] = {}
    points: dict[str, tuple[float, float]] = {}
    for name, func in zip(names, func_tuple, strict=True):
        result = func(used_lrs, used_losses)
        try:
            lr = float(result)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"suggestion function {name!r} must return a learning rate as a number; got "
                f"{result!r}."
            ) from error
        values[name] = lr
        points[name] = (lr, _loss_at(lr, plotted_lrs, plotted_losses))
    return SuggestedLRs.from_dict(values), points


def _unique_names(funcs: Sequence[Callable[..., object]]) -> list[str]:
    names: list[str] = []
    for position, func in enumerate(funcs):
        name = suggestion_name(func, position)
        while name in names:
            name = f"{name}_{position}"
        names.append(name)
    return names


def _loss_at(lr: float, lrs: np.ndarray, losses: np.ndarray) -> float:
    if not (math.isfinite(lr) and lr > 0):
        return math.nan
    return float(np.interp(math.log10(lr), np.log10(lrs), losses))
