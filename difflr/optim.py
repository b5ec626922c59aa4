"""The Learner's optimizer: one for its lifetime, with a named param group per layer group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difflr.groups import GROUP_INDEX_KEY
from difflr.lr import LRSpec, expand_lrs

__all__ = ["make_optimizer"]

OptFunc = Callable[..., torch.optim.Optimizer]


def make_optimizer(
    opt_func: Any, param_groups: list[dict[str, Any]], lr: LRSpec, n_groups: int
) -> torch.optim.Optimizer:
    """Call ``opt_func(param_groups, lr=...)`` with each param group at its layer group's LR.

    Args:
        opt_func: An optimizer class or factory, e.g. ``torch.optim.AdamW`` or
            ``functools.partial(torch.optim.SGD, momentum=0.9)``.
        param_groups: From `difflr.groups.build_param_groups` (each carries its layer group's
            index).
        lr: The LR spec over the ``n_groups`` layer groups.
        n_groups: Number of layer groups.

    Raises:
        TypeError: ``opt_func`` is not a factory, cannot be called that way, or returns
            something that is not a ``torch.optim.Optimizer``.
        ValueError: ``lr`` does not fit ``n_groups``.
    """
    if not callable(opt_func) or isinstance(opt_func, torch.optim.Optimizer):
        raise TypeError(
            f"opt_func must be an optimizer factory such as torch.optim.AdamW or "
            f"functools.partial(torch.optim.SGD, momentum=0.9), got {opt_func!r}."
        )
    lrs = expand_lrs(lr, n_groups, name="lr")
    for pg in param_groups:
        pg["lr"] = lrs[pg[GROUP_INDEX_KEY]]
    try:
        opt = opt_func(param_groups, lr=lrs[-1])
    except TypeError as exc:
        raise TypeError(
            f"opt_func {opt_func!r} could not be called as opt_func(param_groups, lr=...): "
            f"{exc}. Pass a torch optimizer class or a functools.partial of one."
        ) from exc
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"opt_func returned a {type(opt).__name__}, not a torch.optim.Optimizer; pass an "
            "optimizer class such as torch.optim.AdamW."
        )
    return opt
