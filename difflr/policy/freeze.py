"""Which layer groups a ``freeze_to(n)`` freezes: fastai's count, checked.

Pure functions of ints (no model, no torch): the Learner, stages and previews agree on the pattern
because they all ask here.
"""

from __future__ import annotations

from difflr.utils.checks import is_int

__all__ = ["check_freeze_to", "frozen_pattern"]


def check_freeze_to(n: int, n_groups: int) -> int:
    """Validate ``n`` for ``freeze_to`` and return it as a non-negative count of frozen groups.

    Raises:
        TypeError: ``n`` is not an int.
        ValueError: ``n`` is outside ``[-n_groups, n_groups]``.
    """
    if not is_int(n):
        raise TypeError(
            f"freeze_to takes an int (the number of layer groups to freeze, negative counts from "
            f"the end), got {n!r} ({type(n).__name__})."
        )
    if not -n_groups <= n <= n_groups:
        raise ValueError(
            f"freeze_to({n}) is out of range: the model has {n_groups} layer groups, so n must be "
            f"in [-{n_groups}, {n_groups}] (0 unfreezes everything, -1 trains the last group only)."
        )
    n = int(n)  # a numpy integer is an integer
    return n if n >= 0 else n_groups + n


def frozen_pattern(n: int, n_groups: int) -> list[bool]:
    """``[True] * k + [False] * (n_groups - k)`` where ``k`` is ``n`` resolved as in fastai.

    Examples:
        >>> frozen_pattern(-1, 3)
        [True, True, False]
    """
    k = check_freeze_to(n, n_groups)
    return [i < k for i in range(n_groups)]
