"""Vision backbones: a fresh head on a torchvision model, loading by name, ``vision_learner``.

The layer groups of these backbones come from `difflr.groups.splitters` (ResNet-18: stem,
layer1 .. layer4, head); this module builds the model and the Learner around it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

from difflr.groups.splitters import FAMILIES, find_splitter, resnet_splitter, torchvision_family
from difflr.learner import Learner
from difflr.utils.checks import check_int, check_number

# find_splitter and resnet_splitter live in difflr.groups.splitters; they are re-exported here, where the
# first versions of difflr defined them.
__all__ = [
    "create_head",
    "find_splitter",
    "load_arch",
    "replace_head",
    "resnet_splitter",
    "vision_learner",
]

# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------


def create_head(
    n_in: int, n_out: int, hidden: int | None = 512, dropout: float = 0.25
) -> nn.Module:
    """A fastai-style classifier head for pooled, flattened features.

    ``BatchNorm1d(n_in) → Dropout(dropout/2) → Linear(n_in, hidden) → ReLU → BatchNorm1d(hidden)
    → Dropout(dropout) → Linear(hidden, n_out)``; with ``hidden=None``,
    ``BatchNorm1d(n_in) → Dropout(dropout) → Linear(n_in, n_out)``. The batch norms let a
    randomly initialised head train at the high LR of a frozen-body phase.

    Args:
        n_in: Number of features entering the head (the backbone's pooled channels).
        n_out: Number of outputs (classes).
        hidden: Width of the hidden layer, or None for none.
        dropout: Dropout probability before the last linear layer, in [0, 1).

    Returns:
        The head, an ``nn.Sequential`` mapping ``(batch, n_in)`` to ``(batch, n_out)``.

    Raises:
        ValueError: A size is not a positive integer, or ``dropout`` is outside [0, 1).

    Examples:
        >>> import torch
        >>> head = create_head(64, 3).eval()
        >>> head(torch.randn(2, 64)).shape
        torch.Size([2, 3])
    """
    for name, value in (("n_in", n_in), ("n_out", n_out), ("hidden", hidden)):
        if name == "hidden" and value is None:
            continue
        check_int(value, name, 1)
    check_number(dropout, "dropout", 0, 1, open_low=False, what="a probability")
    if hidden is None:
        return nn.Sequential(nn.BatchNorm1d(n_in), nn.Dropout(dropout), nn.Linear(n_in, n_out))
    return nn.Sequential(
        nn.BatchNorm1d(n_in),
        nn.Dropout(dropout / 2),
        # No bias: the batch norm that follows would cancel it.
        nn.Linear(n_in, hidden, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden),
        nn.Dropout(dropout),
        nn.Linear(hidden, n_out),
    )


def _classifier_slot(model: nn.Module, family: str) -> tuple[nn.Module, str]:
    """The (parent, attribute) holding the part of ``model`` that ``replace_head`` swaps."""
    if family in ("resnet", "regnet", "shufflenet_v2"):
        return model, "fc"
    if family == "convnext":
        # Keep LayerNorm2d and Flatten: the head receives flattened, normalised features.
        return model.classifier, str(len(model.classifier) - 1)
    if family == "vit":
        return model, "heads"
    if family == "swin":
        return model, "head"
    return model, "classifier"  # efficientnet, mobilenet v2/v3, densenet, vgg, mnasnet


def _n_features(model: nn.Module, family: str, old: nn.Module) -> int | None:
    """Number of features entering ``old``: its first Linear's, else the backbone's width."""
    first_linear = next((m for m in old.modules() if isinstance(m, nn.Linear)), None)
    if first_linear is not None:
        return first_linear.in_features
    if family == "vit":
        return model.hidden_dim
    if family == "swin":
        return model.norm.normalized_shape[0]
    if family == "convnext":
        return model.classifier[0].normalized_shape[0]
    return None


def replace_head(model: nn.Module, n_out: int, head: nn.Module | None = None) -> nn.Module:
    """Replace the classifier of a torchvision backbone, in place.

    What is replaced: ``fc`` (ResNet, RegNet, ShuffleNetV2), ``classifier[-1]`` (ConvNeXt, which
    keeps its LayerNorm2d and Flatten), ``classifier`` (EfficientNet, MobileNet v2/v3, DenseNet,
    VGG, MNASNet), ``heads`` (ViT) or ``head`` (Swin). All of them receive pooled, flattened
    features, so ``model(x)`` has shape ``(batch, n_out)`` afterwards, and ``find_splitter`` puts
    the new head in the head group.

    Args:
        model: A torchvision model of one of those families.
        n_out: Number of outputs (classes) of the new head.
        head: The new head; by default ``create_head(n_features, n_out)``, on the device and
            dtype of the old classifier.

    Returns:
        ``model`` itself, with its head replaced.

    Raises:
        TypeError: ``model`` is not a recognised torchvision family, or ``head`` no module.
        ValueError: ``n_out`` is not a positive integer, or the number of features cannot be
            read from the current head (it has no Linear layer); pass ``head``.

    Examples:
        >>> import torch, torchvision
        >>> model = replace_head(torchvision.models.resnet18(weights=None), n_out=3).eval()
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 3])
    """
    family = torchvision_family(model)
    if family is None:
        known = ", ".join(name for name, _, _ in FAMILIES)
        raise TypeError(
            f"replace_head knows the torchvision families {known}; got a "
            f"{type(model).__name__}. Set its classifier yourself (timm: model.reset_classifier)."
        )
    check_int(n_out, "n_out", 1, what="a number of outputs")
    if head is not None and not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module, got {type(head).__name__}.")
    parent, attribute = _classifier_slot(model, family)
    old = getattr(parent, attribute)
    if head is None:
        n_features = _n_features(model, family, old)
        if n_features is None:
            raise ValueError(
                f"cannot read the number of features entering the {family} head "
                f"({type(old).__name__} has no Linear layer); pass head=your_module."
            )
        head = create_head(n_features, n_out)
        reference = next(old.parameters(), next(model.parameters(), None))
        if reference is not None:
            head = head.to(device=reference.device, dtype=reference.dtype)
    setattr(parent, attribute, head)
    return model


# --------------------------------------------------------------------------------------------
# Loading architectures
# --------------------------------------------------------------------------------------------


def _builder(arch: str) -> Callable[..., nn.Module]:
    try:
        return tvm.get_model_builder(arch.lower())
    except ValueError:
        close = difflib.get_close_matches(arch.lower(), tvm.list_models(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown torchvision model {arch!r}.{hint} torchvision.models.list_models() lists "
            "the names (e.g. 'resnet18', 'convnext_tiny'); or pass a builder or an nn.Module."
        ) from None


def _resolve_weights(builder: Callable[..., nn.Module], weights: str | WeightsEnum) -> WeightsEnum:
    name = getattr(builder, "__name__", repr(builder))
    try:
        enum = tvm.get_model_weights(builder)
    except (ValueError, TypeError, KeyError):
        raise ValueError(
            f"{name} has no torchvision weights enum, so weights={weights!r} cannot be resolved; "
            "pass weights=None and load the state dict yourself."
        ) from None
    try:
        # verify accepts "DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", a member.
        return enum.verify(weights)
    except (KeyError, TypeError):
        available = ", ".join(["DEFAULT", *(member.name for member in enum)])
        raise ValueError(
            f"{weights!r} are not weights of {name}; pass one of {available} "
            f"(or {enum.__name__}.<NAME>), or weights=None."
        ) from None


def _cached_weights_path(weights: WeightsEnum) -> Path:
    # Where torch.hub.load_state_dict_from_url looks before it downloads.
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_arch(
    arch: str | Callable[..., nn.Module] | nn.Module,
    weights: str | WeightsEnum | None = None,
    *,
    allow_download: bool = False,
) -> nn.Module:
    """Build a torchvision model by name or builder, with weights from the local cache only.

    Args:
        arch: A torchvision model name (``"resnet18"``), a builder
            (``torchvision.models.resnet18``), or a model, returned as is.
        weights: None for random initialisation, or torchvision weights: ``"DEFAULT"``, a member
            name (``"IMAGENET1K_V1"``), ``"ResNet18_Weights.IMAGENET1K_V1"``, or the enum member.
        allow_download: Let torchvision download weights missing from the cache. Off by default
            because no network access is assumed (this project's machines have none), so a
            missing file fails fast with instructions instead of a download traceback.

    Returns:
        The model.

    Raises:
        ValueError: Unknown model name; weights that do not belong to ``arch``; weights given
            together with a model instance.
        TypeError: ``arch`` is neither a string, a callable nor an nn.Module.
        RuntimeError: The weights file is not in ``torch.hub.get_dir()/checkpoints`` and
            ``allow_download`` is False; the message names the file, its URL and where to put it.

    Examples:
        >>> model = load_arch("resnet18")
        >>> type(model).__name__
        'ResNet'
    """
    if isinstance(arch, nn.Module):
        if weights is not None:
            raise ValueError(
                f"arch is already a {type(arch).__name__} instance, so weights={weights!r} "
                "cannot be applied; pass the model's name or builder with weights, or load the "
                "state dict into the instance yourself."
            )
        return arch
    if isinstance(arch, str):
        builder = _builder(arch)
    elif callable(arch):
        builder = arch
    else:
        raise TypeError(
            f"arch must be a torchvision model name, a builder or an nn.Module, got "
            f"{type(arch).__name__}."
        )
    if weights is None:
        return builder()
    resolved = _resolve_weights(builder, weights)
    path = _cached_weights_path(resolved)
    if not allow_download and not path.is_file():
        raise RuntimeError(
            f"the weights {resolved} are not in the local cache, and load_arch does not download "
            f"(no network access is available here). Missing file: {path.name}. Fetch "
            f"{resolved.url} where the network is reachable and put it at {path} (the "
            "directory is torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it), or pass "
            "weights=None to start from random weights, or allow_download=True."
        )
    return builder(weights=resolved)


# --------------------------------------------------------------------------------------------
# vision_learner
# --------------------------------------------------------------------------------------------


def vision_learner(
    arch: str | Callable[..., nn.Module] | nn.Module,
    data: Any,
    n_out: int,
    weights: str | WeightsEnum | None = None,
    head: nn.Module | None = None,
    **learner_kwargs: Any,
) -> Learner:
    """A Learner for a torchvision backbone with a fresh head, as fastai's ``vision_learner``.

    ``load_arch(arch, weights)``, then ``replace_head(model, n_out, head)``, then a ``Learner``
    whose layer groups come from the built-in splitter (ResNet-18: stem, layer1 .. layer4, head).
    With pretrained ``weights`` the body is frozen (``learn.freeze()``: only the new head and the
    normalisation layers train) until you call ``learn.unfreeze()``.

    Args:
        arch: A torchvision model name (``"resnet18"``), a builder, or a model (then
            ``weights`` must be None; its head is replaced all the same).
        data: ``(train_dl, valid_dl)`` or a ``LightningDataModule``, as for ``Learner``.
        n_out: Number of outputs (classes) of the new head.
        weights: None for random initialisation, or torchvision weights (``"DEFAULT"``,
            ``"IMAGENET1K_V1"``, an enum member), read from the local cache only: see
            ``load_arch``.
        head: The new head, receiving pooled, flattened features; by default
            ``create_head(n_features, n_out)`` (batch norm, a hidden layer of 512, dropout).
        **learner_kwargs: Passed to ``Learner`` (``loss_func`` defaults to
            ``F.cross_entropy``; ``metrics``, ``splitter``, ``path``, ``lr``, Trainer
            arguments, ...).

    Returns:
        The Learner, frozen to its head when ``weights`` is given.

    Raises:
        ValueError, TypeError, RuntimeError: As ``load_arch``, ``replace_head`` and ``Learner``
            raise them; in particular a ``RuntimeError`` naming the missing file when
            ``weights`` are not in the local cache (nothing is downloaded).

    Examples:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
        >>> learn = vision_learner("resnet18", (DataLoader(ds, batch_size=4), None), n_out=3,
        ...                        logger=False, enable_progress_bar=False)
        >>> [g.name for g in learn.splits]
        ['0.stem', '1.layer1', '2.layer2', '3.layer3', '4.layer4', '5.head']
        >>> learn.model.eval()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 3])
    """
    model = replace_head(load_arch(arch, weights), n_out, head)
    loss_func = learner_kwargs.pop("loss_func", F.cross_entropy)
    learn = Learner(model, data, loss_func=loss_func, **learner_kwargs)
    if weights is not None:
        learn.freeze()
    return learn
