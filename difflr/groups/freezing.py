"""Freezing: which layer groups train, and the normalisation-layer policy.

Freezing only flips ``requires_grad``; the optimizer keeps every layer group as a param group for
the Learner's lifetime and skips parameters whose ``.grad`` is ``None``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from difflr.groups.layers import NORM_TYPES, LayerGroup, norm_param_ids
from difflr.utils.checks import user_stacklevel

__all__ = ["apply_freeze", "frozen_norms_eval", "trainable_flags"]


def apply_freeze(
    model: nn.Module, groups: Sequence[LayerGroup], frozen: Sequence[bool], train_bn: bool = True
) -> None:
    """Set ``requires_grad`` for every group's params from the ``frozen`` flags.

    With ``train_bn=True`` normalisation-layer params stay trainable inside frozen groups (their
    statistics are specific to the new data); with ``train_bn=False`` they are frozen too, and
    `frozen_norms_eval` keeps those layers in eval mode while training. A group's ``fixed``
    parameters (the base weights of an adapter model) stay frozen in any pattern. Gradients of
    params that become frozen are dropped so the optimizer skips them.
    """
    norm_ids = norm_param_ids(model) if train_bn else set()
    for group, is_frozen in zip(groups, frozen, strict=True):
        fixed = {id(p) for p in group.fixed}  # base weights of an adapter model: never trained
        for p in group.params:
            trainable = (not is_frozen or id(p) in norm_ids) and id(p) not in fixed
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None
    if all(frozen) and not norm_ids:
        warnings.warn(
            "every layer group is frozen, so nothing will train; call unfreeze() or freeze_to(n) "
            "with n < the number of groups.",
            stacklevel=user_stacklevel(),
        )


def trainable_flags(groups: Sequence[LayerGroup]) -> list[bool]:
    """For each group, whether any of its params requires grad."""
    return [any(p.requires_grad for p in g.params) for g in groups]


def frozen_norms_eval(model: nn.Module) -> None:
    """Put the normalisation layers whose parameters are all frozen in eval mode, the others back
    in the model's mode.

    With ``train_bn=False`` the norm layers of frozen groups are frozen too: in eval mode their
    running statistics stop moving and they normalise with them, as fastai's ``BnFreeze`` and
    Lightning's ``BaseFinetuning.freeze(train_bn=False)`` intend. Call it after ``model.train()``
    (each fit) and after each change of the frozen pattern. A layer without parameters
    (``affine=False``) follows the layer whose output it normalises: the nearest one before it
    (in the model's order) that has parameters of its own, else the nearest one after it.
    """
    owners = [
        (module, list(module.parameters(recurse=False)))
        for module in model.modules()
        if isinstance(module, NORM_TYPES)
        or next(module.parameters(recurse=False), None) is not None
    ]
    for i, (module, params) in enumerate(owners):
        if not isinstance(module, NORM_TYPES):
            continue
        if not params:  # affine=False: the neighbour that feeds it decides
            before = [ps for _, ps in reversed(owners[:i]) if ps]
            neighbours = before or [ps for _, ps in owners[i + 1 :] if ps]
            if not neighbours:
                continue
            params = neighbours[0]
        module.train(model.training and any(p.requires_grad for p in params))
