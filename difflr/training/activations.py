"""What the model's outputs mean after a fit: probabilities and each item's loss.

The activation that turns outputs into what a loss function compares with the targets
(`activation_for`: softmax for cross-entropy, sigmoid for BCE with logits, ``exp`` for NLL),
whether it gives one label per item or several, and each item's loss from any loss function
(`per_item_loss`). `difflr.predictions` and `difflr.interpretation` read outputs through these."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from difflr.utils.checks import check_callable
from difflr.utils.nested import n_items, take

__all__ = [
    "MULTI_LABEL_THRESHOLD",
    "Activation",
    "activate",
    "activation_for",
    "check_act",
    "exp_of_log_probs",
    "identity",
    "is_multi_label",
    "is_single_label",
    "loss_func_of",
    "per_item_loss",
    "sigmoid",
    "softmax_over_classes",
]

Activation = Callable[[torch.Tensor], torch.Tensor]


#: Probability above which `predict` calls a label present, for multi-label (sigmoid) models.
MULTI_LABEL_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- activations
def softmax_over_classes(preds: torch.Tensor) -> torch.Tensor:
    """Softmax over the class dimension, dim 1 (``(N, C)``, ``(N, C, H, W)``), where
    cross-entropy reads the classes."""
    return preds.softmax(dim=1 if preds.ndim > 1 else 0)


def exp_of_log_probs(preds: torch.Tensor) -> torch.Tensor:
    """``exp``: probabilities from the log-probabilities that ``nll_loss`` reads."""
    return preds.exp()


def sigmoid(preds: torch.Tensor) -> torch.Tensor:
    """Each output's own probability, for binary cross-entropy with logits (multi-label)."""
    return torch.sigmoid(preds)


def identity(preds: Any) -> Any:
    """The outputs as they are."""
    return preds


def _unwrap(loss_func: Any) -> Any:
    while isinstance(loss_func, functools.partial):
        loss_func = loss_func.func
    return loss_func


def activation_for(loss_func: Any) -> Activation:
    """The activation that turns a model's outputs into what its loss compares with the targets:
    the default ``act`` of `get_preds`.

    The rule, first match wins:

    1. the loss's own ``activation`` attribute, if it is callable (fastai's convention: give
       your loss class one);
    2. cross-entropy (``F.cross_entropy``, ``nn.CrossEntropyLoss`` and its subclasses, also
       inside a ``functools.partial``) → softmax over the classes (dim 1);
    3. binary cross-entropy with logits (``F.binary_cross_entropy_with_logits``,
       ``nn.BCEWithLogitsLoss``) → sigmoid;
    4. negative log-likelihood (``F.nll_loss``, ``nn.NLLLoss``) → ``exp``;
    5. anything else (``F.mse_loss``, a function of your own, no loss at all) → identity.

    Args:
        loss_func: The loss function, or ``None``.

    Examples:
        >>> activation_for(F.cross_entropy)(torch.tensor([[0.0, 0.0]]))
        tensor([[0.5000, 0.5000]])
        >>> activation_for(lambda preds, target: (preds - target).abs().mean()) is identity
        True
    """
    own = getattr(loss_func, "activation", None)
    if callable(own):
        return own
    loss = _unwrap(loss_func)
    if loss is F.cross_entropy or isinstance(loss, nn.CrossEntropyLoss):
        return softmax_over_classes
    if loss is F.binary_cross_entropy_with_logits or isinstance(loss, nn.BCEWithLogitsLoss):
        return sigmoid
    if loss is F.nll_loss or isinstance(loss, nn.NLLLoss):
        return exp_of_log_probs
    return identity


def is_single_label(act: Any) -> bool:
    """Whether ``act`` makes one probability per class that sum to 1 (one label per item)."""
    return act in (softmax_over_classes, exp_of_log_probs)


def is_multi_label(act: Any) -> bool:
    """Whether ``act`` makes an independent probability per output (any number of labels)."""
    return act is sigmoid


def check_act(act: Activation | None) -> None:
    """Refuse an ``act`` that is not callable, before the prediction pass rather than after it."""
    if act is not None:
        check_callable(act, "act", "act(preds) -> tensor")


def activate(preds: Any, act: Activation | None, module: pl.LightningModule) -> Any:
    """``act(preds)``; with ``act=None``, `activation_for` the module's loss function, applied
    to a tensor of outputs (a tuple or dict of outputs is returned as it is: the rule does not
    know which one to activate)."""
    if act is not None:
        return act(preds)
    if isinstance(preds, torch.Tensor):
        return activation_for(loss_func_of(module))(preds)
    return preds


def loss_func_of(module: pl.LightningModule) -> Callable[..., torch.Tensor] | None:
    """The loss function of a module: a Learner's ``loss_func``, or a ``loss_func`` attribute
    of your own ``LightningModule``; ``None`` when there is none."""
    loss_func = getattr(module, "loss_func", None)
    return loss_func if callable(loss_func) else None


# ----------------------------------------------------------------------------- per-item losses
def per_item_loss(
    loss_func: Callable[..., torch.Tensor], preds: Any, target: Sequence[Any]
) -> torch.Tensor:
    """Each item's loss, shape ``(n_items,)``: what ``loss_func`` gives for that item alone.

    Three ways, the first that applies:

    1. a loss object with a ``reduction`` attribute (``nn.CrossEntropyLoss()``, fastai's losses)
       is called through a shallow copy with ``reduction="none"`` (yours is not changed);
    2. a function with a ``reduction`` parameter (``F.cross_entropy``, also in a
       ``functools.partial``) is called with ``reduction="none"``;
    3. any other function is called once per item, on a batch of one.

    An unreduced loss with more dimensions than the items (pixels, outputs) is averaged over
    them, which is what the loss of a batch of one gives.

    Args:
        loss_func: Called as ``loss_func(preds, *target)``.
        preds: The model's outputs for a batch (a tensor, or a tuple/dict of them).
        target: The batch's target(s).

    Raises:
        ValueError: ``loss_func`` gives something other than one number for one item.

    Examples:
        >>> preds, target = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])
        >>> per_item_loss(F.cross_entropy, preds, (target,))
        tensor([0.1269, 2.1269])
        >>> per_item_loss(lambda p, t: F.cross_entropy(p, t), preds, (target,))
        tensor([0.1269, 2.1269])
    """
    n = n_items(preds)
    losses = None
    if isinstance(getattr(loss_func, "reduction", None), str):
        unreduced = copy.copy(loss_func)
        unreduced.reduction = "none"
        losses = unreduced(preds, *target)
    elif _has_parameter(loss_func, "reduction"):
        losses = loss_func(preds, *target, reduction="none")
    if isinstance(losses, torch.Tensor) and losses.ndim >= 1 and losses.shape[0] == n:
        return losses.detach().reshape(n, -1).float().mean(dim=1)
    # A function without `reduction` (or one that ignores it): a batch of one per item.
    items = []
    for i in range(n):
        loss = loss_func(take(preds, slice(i, i + 1)), *(take(t, slice(i, i + 1)) for t in target))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_func gave {type(loss).__name__}"
                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''} for a batch of "
                "one item; per-item losses need a loss_func that returns one number per batch."
            )
        items.append(loss.detach().reshape(()).float())
    return torch.stack(items) if items else torch.empty(0)


def _has_parameter(func: Any, name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
