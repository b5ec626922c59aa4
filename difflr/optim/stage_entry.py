"""Entering a stage: the model and its optimizer put in the state a stage trains in.

The Learner (``freeze_to``, each stage of ``fit_stages``, ``load``) and `GradualUnfreezing` (at
each stage's first epoch) both come here, so a plan run either way freezes, clears and decays
alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from difflr.groups.freezing import apply_freeze, frozen_norms_eval
from difflr.groups.layers import LayerGroup
from difflr.optim.param_groups import set_weight_decay

__all__ = ["enter_stage"]


def enter_stage(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    optimizer: torch.optim.Optimizer,
    frozen: Sequence[bool] | None,
    *,
    previous: Sequence[bool] | None = None,
    train_bn: bool = True,
    wd: float | None = None,
) -> None:
    """Put ``model`` and ``optimizer`` in the state a stage trains in.

    1. A frozen pattern other than ``previous`` clears the optimizer's state (its momentum
       buffers belong to the pattern that trained them), as fastai does.
    2. The pattern is applied (`difflr.groups.freezing.apply_freeze`): frozen groups' params stop
       requiring grad, normalisation layers stay trainable with ``train_bn=True``.
    3. With ``train_bn=False`` the normalisation layers whose params are frozen are put in eval
       mode (`difflr.groups.freezing.frozen_norms_eval`).
    4. ``wd`` is set on the decayed param groups (`difflr.optim.param_groups.set_weight_decay`).

    Args:
        model: The model the layer groups belong to.
        groups: Its layer groups.
        optimizer: Its optimizer (one param group or more per layer group).
        frozen: For each layer group, whether it is frozen; ``None`` keeps the pattern in place
            (and the optimizer's state).
        previous: The pattern the optimizer's state was made under; ``None`` when it is not one
            that difflr set (a module's own), so that any ``frozen`` counts as a change. Pass
            ``frozen`` itself to keep the state (a resume, whose state is the checkpoint's).
        train_bn: Keep normalisation layers trainable in frozen groups.
        wd: Weight decay; ``None`` keeps the current one.
    """
    if frozen is not None:
        if previous is None or list(previous) != list(frozen):
            optimizer.state.clear()
        apply_freeze(model, groups, frozen, train_bn)
    if not train_bn:
        frozen_norms_eval(model)
    set_weight_decay(optimizer, wd)
