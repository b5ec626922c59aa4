"""Vision backbones: layer groups for known architectures, head replacement, model loading.

``find_splitter`` recognises the torchvision classification families (ResNet/ResNeXt/Wide-ResNet,
ConvNeXt, EfficientNet v1/v2, MobileNet v2/v3, RegNet, DenseNet, VGG, ViT, Swin, ShuffleNetV2,
MNASNet) and, when timm is installed, every timm model that declares its own ``group_matcher``.
It also finds such a backbone inside a wrapper (an ``nn.Sequential``, a ``LightningModule`` or any
module holding it as an attribute). The groups it returns go stem first, stages in forward order,
head last, and cover every parameter of the model exactly once.

Most families are cut where the feature map's resolution halves, as ResNet's ``layer1..layer4``
are, so a discriminative ``slice(lo, hi)`` spreads over comparable stages whatever the backbone.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2

from difflr.groups import Splitter

if TYPE_CHECKING:
    from difflr.learner import Learner

__all__ = [
    "create_head",
    "find_splitter",
    "load_arch",
    "replace_head",
    "resnet_splitter",
    "vision_learner",
]

#: Layer groups as this module builds them: ``{name: params}``, in forward order, head last.
NamedGroups: TypeAlias = "dict[str, list[nn.Parameter]]"

# Children of these types are patch-merging steps: Swin's way of halving the resolution.
_MERGING_TYPES = (PatchMerging, PatchMergingV2)
# Number of stages a ViT's encoder blocks are cut into, to match the CNNs' four stages.
_VIT_STAGES = 4


# --------------------------------------------------------------------------------------------
# Helpers shared by the splitters
# --------------------------------------------------------------------------------------------


def _params(*items: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    """Parameters of ``items`` (modules or parameters), in order, each once."""
    seen: dict[int, nn.Parameter] = {}
    for item in items:
        params = [item] if isinstance(item, nn.Parameter) else item.parameters()
        for p in params:
            seen.setdefault(id(p), p)
    return list(seen.values())


def _stride_above_one(stride: int | Sequence[int] | None) -> bool:
    if stride is None:
        return False
    strides = (stride,) if isinstance(stride, int) else tuple(stride)
    return max(strides) > 1


def _downsamples(module: nn.Module) -> bool:
    """Whether ``module`` halves (or more) the feature map: a strided conv or pool, a patch merge."""
    for m in module.modules():
        if isinstance(m, _MERGING_TYPES):
            return True
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and _stride_above_one(m.stride):
            return True
    return False


def _split_by_resolution(
    stem: Sequence[nn.Module],
    blocks: Sequence[nn.Module],
    head: Sequence[nn.Module],
    stage_after_stem: bool = False,
) -> NamedGroups:
    """Groups ``stem``, then one ``stage{k}`` per resolution, then ``head``.

    A block that downsamples starts a new stage (as the first block of ResNet's ``layer2`` does);
    any other block joins the current one. Blocks that run at the stem's resolution join the stem
    (MobileNet's and EfficientNet's thin first block) unless ``stage_after_stem`` makes them the
    first stage (DenseNet's first dense block, Swin's first stage).
    """
    stages: list[list[nn.Module]] = [list(stem)]
    for index, block in enumerate(blocks):
        starts_stage = _downsamples(block) or (stage_after_stem and index == 0)
        if starts_stage and _params(*stages[-1]):
            stages.append([])
        stages[-1].append(block)
    groups = {"stem": _params(*stages[0])}
    groups.update({f"stage{k}": _params(*stage) for k, stage in enumerate(stages[1:], 1)})
    groups["head"] = _params(*head)
    return groups


def _chunks(items: Sequence[Any], n_chunks: int) -> list[list[Any]]:
    """``items`` cut into ``n_chunks`` runs whose lengths differ by at most one, longer first."""
    n_chunks = min(n_chunks, len(items))
    size, extra = divmod(len(items), n_chunks)
    chunks, start = [], 0
    for k in range(n_chunks):
        stop = start + size + (1 if k < extra else 0)
        chunks.append(list(items[start:stop]))
        start = stop
    return chunks


def _drop_empty(groups: NamedGroups) -> NamedGroups:
    # A head replaced by nn.Identity (a features-only backbone) leaves an empty group, which
    # split_model would reject; the model then simply has no head group.
    return {name: params for name, params in groups.items() if params}


# --------------------------------------------------------------------------------------------
# One splitter per family: each returns every group, "head" last even when empty
# --------------------------------------------------------------------------------------------


def _resnet_groups(model: nn.Module) -> NamedGroups:
    names = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
    missing = [name for name in names if not isinstance(getattr(model, name, None), nn.Module)]
    if missing:
        raise TypeError(
            f"resnet_splitter needs a ResNet-like model with modules {', '.join(names)}; "
            f"{type(model).__name__} lacks {', '.join(missing)}. Pass a splitter written for it."
        )
    return {
        "stem": _params(model.conv1, model.bn1),
        "layer1": _params(model.layer1),
        "layer2": _params(model.layer2),
        "layer3": _params(model.layer3),
        "layer4": _params(model.layer4),
        "head": _params(model.fc),
    }


def _features_classifier_groups(model: nn.Module) -> NamedGroups:
    # EfficientNet, MobileNet v2/v3: features[0] is the stem; the last 1x1 conv joins the last
    # stage, as timm groups it.
    features = list(model.features)
    return _split_by_resolution(features[:1], features[1:], [model.classifier])


def _convnext_groups(model: nn.Module) -> NamedGroups:
    # The patchify stem already downsamples 4x, so the first stage of blocks runs at its
    # resolution; it is a full stage all the same. Each later stage opens with its downsampling.
    features = list(model.features)
    return _split_by_resolution(
        features[:1], features[1:], [model.classifier], stage_after_stem=True
    )


def _vgg_groups(model: nn.Module) -> NamedGroups:
    # The convs before the first max-pool are the stem; each pool starts a stage.
    return _split_by_resolution([], list(model.features), [model.classifier])


def _densenet_groups(model: nn.Module) -> NamedGroups:
    # conv0/norm0/relu0/pool0 are the stem; each transition (which pools) opens the next stage.
    features = list(model.features)
    return _split_by_resolution(
        features[:4], features[4:], [model.classifier], stage_after_stem=True
    )


def _mnasnet_groups(model: nn.Module) -> NamedGroups:
    # layers[0:8] (conv, depthwise-separable conv) are the stem; [8:14] the stacks; [14:] the
    # final 1x1 conv, which joins the last stage.
    layers = list(model.layers)
    return _split_by_resolution(layers[:8], layers[8:], [model.classifier])


def _regnet_groups(model: nn.Module) -> NamedGroups:
    groups = {"stem": _params(model.stem)}
    groups.update({name: _params(stage) for name, stage in model.trunk_output.named_children()})
    groups["head"] = _params(model.fc)
    return groups


def _shufflenet_groups(model: nn.Module) -> NamedGroups:
    # torchvision keeps the paper's names stage2..stage4; conv5 (final 1x1) joins stage4.
    return {
        "stem": _params(model.conv1),
        "stage2": _params(model.stage2),
        "stage3": _params(model.stage3),
        "stage4": _params(model.stage4, model.conv5),
        "head": _params(model.fc),
    }


def _vit_groups(model: nn.Module) -> NamedGroups:
    # The class token and position embedding are input-side, so they train with the patch
    # projection; the final LayerNorm feeds the classifier only, so it goes with the head.
    encoder = model.encoder
    groups = {"stem": _params(model.conv_proj, model.class_token, encoder.pos_embedding)}
    for k, blocks in enumerate(_chunks(list(encoder.layers), _VIT_STAGES), 1):
        groups[f"stage{k}"] = _params(*blocks)
    groups["head"] = _params(encoder.ln, model.heads)
    return groups


def _swin_groups(model: nn.Module) -> NamedGroups:
    features = list(model.features)
    return _split_by_resolution(
        features[:1], features[1:], [model.norm, model.head], stage_after_stem=True
    )


def _timm_groups(model: nn.Module) -> NamedGroups:
    # timm declares each model's groups as data (group_matcher regexes) and maps parameters to
    # them with group_parameters, as its layer-decay optimizer does; unmatched parameters (the
    # classifier) land in the last group.
    from timm.models import group_parameters

    layer_to_names = group_parameters(model, model.group_matcher(coarse=True))
    named = dict(model.named_parameters())
    head_ids = {id(p) for p in _timm_classifier_params(model)}
    ordered = [layer_to_names[layer] for layer in sorted(layer_to_names)]
    groups: NamedGroups = {}
    for index, names in enumerate(ordered):
        params = [named[name] for name in names]
        if index == len(ordered) - 1 and head_ids & {id(p) for p in params}:
            key = "head"
        elif index == 0 and len(ordered) > 1:
            key = "stem"
        else:
            key = _readable_name(names, index)
        while key in groups:  # two groups under one module path, e.g. a stage split by a matcher
            key = f"{key}_"
        groups[key] = params
    groups.setdefault("head", [])
    return groups


def _timm_classifier_params(model: nn.Module) -> list[nn.Parameter]:
    classifier = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else ()
    # Distilled models (DeiT) return a tuple of two heads.
    modules = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    return _params(*(m for m in modules if isinstance(m, nn.Module)))


def _readable_name(param_names: Sequence[str], index: int) -> str:
    """The module path the parameters share, up to its first index ("layer1", "blocks_3")."""
    paths = [name.split(".")[:-1] for name in param_names]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    # A group that merged a block with a following norm ("blocks.11.*" and "norm.*") shares no
    # path: name it after its first block.
    path = common or paths[0]
    digits = [i for i, part in enumerate(path) if part.isdigit()]
    if digits:
        path = path[: digits[0] + 1]
    return "_".join(path) or f"group{index}"


_FAMILIES: tuple[tuple[str, type[nn.Module], Callable[[nn.Module], NamedGroups]], ...] = (
    ("resnet", tvm.ResNet, _resnet_groups),
    ("convnext", tvm.ConvNeXt, _convnext_groups),
    ("efficientnet", tvm.EfficientNet, _features_classifier_groups),
    ("mobilenet_v2", tvm.MobileNetV2, _features_classifier_groups),
    ("mobilenet_v3", tvm.MobileNetV3, _features_classifier_groups),
    ("regnet", tvm.RegNet, _regnet_groups),
    ("densenet", tvm.DenseNet, _densenet_groups),
    ("vgg", tvm.VGG, _vgg_groups),
    ("vit", tvm.VisionTransformer, _vit_groups),
    ("swin", tvm.SwinTransformer, _swin_groups),
    ("shufflenet_v2", tvm.ShuffleNetV2, _shufflenet_groups),
    ("mnasnet", tvm.MNASNet, _mnasnet_groups),
)
_GROUPERS: dict[str, Callable[[nn.Module], NamedGroups]] = {
    name: grouper for name, _, grouper in _FAMILIES
}
_GROUPERS["timm"] = _timm_groups


def _torchvision_family(module: nn.Module) -> str | None:
    return next((name for name, cls, _ in _FAMILIES if isinstance(module, cls)), None)


def _family(module: nn.Module) -> str | None:
    """The family name of a recognised backbone, else None."""
    family = _torchvision_family(module)
    if family is None and callable(getattr(module, "group_matcher", None)) and _has_timm():
        family = "timm"
    return family


def _has_timm() -> bool:
    try:
        import timm.models  # noqa: F401  (optional dependency, imported only for timm models)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Public splitters
# --------------------------------------------------------------------------------------------


def resnet_splitter(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Cut a ResNet (ResNet, ResNeXt, Wide-ResNet, or any model with the same attributes) in six.

    Args:
        model: A model with modules ``conv1``, ``bn1``, ``layer1`` .. ``layer4`` and ``fc``.

    Returns:
        ``{"stem": conv1+bn1, "layer1": ..., "layer4": ..., "head": fc}`` as lists of parameters;
        ``"head"`` is left out when ``fc`` has no parameters (``nn.Identity``).

    Raises:
        TypeError: ``model`` lacks one of those modules.

    Examples:
        >>> import torchvision
        >>> from difflr.groups import split_model
        >>> model = torchvision.models.resnet18(weights=None)
        >>> [g.name for g in split_model(model, resnet_splitter)]
        ['0.stem', '1.layer1', '2.layer2', '3.layer3', '4.layer4', '5.head']
    """
    return _drop_empty(_resnet_groups(model))


@dataclass(frozen=True)
class _ArchSplitter:
    """Splitter for a recognised backbone at ``path`` inside the model (``""``: the model itself).

    Parameters of the model outside the backbone (a wrapper's own layers) are added to the first
    group when they are registered before the backbone, to the head group otherwise. A dataclass
    rather than a closure so that it pickles (DDP spawn) and its repr says what was found.
    """

    family: str
    path: str = ""

    def __call__(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        try:
            backbone = model.get_submodule(self.path) if self.path else model
        except AttributeError as error:
            raise ValueError(
                f"this splitter was made for a model holding a {self.family} backbone at "
                f"{self.path!r}, but {type(model).__name__} has no such submodule; call "
                "find_splitter on this model."
            ) from error
        groups = _GROUPERS[self.family](backbone)
        covered = {id(p) for params in groups.values() for p in params}
        before, after = [], []
        reached = False
        for p in model.parameters():
            if id(p) in covered:
                reached = True
                continue
            # Registration order stands in for forward order: an adapter defined before the
            # backbone runs before it; a head defined after runs after.
            (after if reached else before).append(p)
        names = list(groups)
        groups[names[0]] = before + groups[names[0]]
        groups[names[-1]] = groups[names[-1]] + after
        return _drop_empty(groups)


def find_splitter(model: nn.Module) -> Splitter | None:
    """A splitter for a known architecture, or for a wrapper that holds exactly one.

    Recognised: torchvision ResNet/ResNeXt/Wide-ResNet (``stem``, ``layer1`` .. ``layer4``,
    ``head``), ConvNeXt, EfficientNet v1/v2, MobileNet v2/v3, DenseNet, VGG, ViT, Swin and MNASNet
    (``stem``, ``stage1`` .. ``stage4``, ``head``: one stage per feature-map resolution, or four
    runs of encoder blocks for ViT), RegNet (``stem``, ``block1`` .. ``block4``, ``head``),
    ShuffleNetV2 (``stem``, ``stage2`` .. ``stage4``, ``head``), subclasses of these, and, when
    timm is installed, any timm model with ``group_matcher`` (timm's coarse groups, named after
    their modules). A model that is none of these but holds exactly one of them (inside an
    ``nn.Sequential``, as ``self.model`` of a ``LightningModule``, ...) is split around it: its
    other parameters join the first group if registered before the backbone, the head otherwise.

    Args:
        model: The model to be trained.

    Returns:
        ``splitter(model) -> {name: params}``, stem first and head last, covering every parameter
        once; ``None`` when no backbone is recognised, or when several are (pass a splitter).

    Examples:
        >>> import torchvision
        >>> from torch import nn
        >>> model = nn.Sequential(torchvision.models.resnet18(weights=None), nn.Linear(1000, 2))
        >>> splitter = find_splitter(model)
        >>> list(splitter(model))
        ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']
        >>> find_splitter(nn.Linear(4, 2)) is None
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_splitter needs an nn.Module, got {type(model).__name__}.")
    family = _family(model)
    if family is not None:
        return _ArchSplitter(family)
    found: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(f"{outer}.") for outer, _ in found):
            continue  # the model itself, or a part of a backbone already found
        family = _family(module)
        if family is not None:
            found.append((path, family))
    if len(found) != 1:
        return None
    path, family = found[0]
    return _ArchSplitter(family, path)


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
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
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
    family = _torchvision_family(model)
    if family is None:
        known = ", ".join(name for name, _, _ in _FAMILIES)
        raise TypeError(
            f"replace_head knows the torchvision families {known}; got a "
            f"{type(model).__name__}. Set its classifier yourself (timm: model.reset_classifier)."
        )
    if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1:
        raise ValueError(f"n_out must be a positive integer, got {n_out!r}.")
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
    from difflr.learner import Learner  # lazy: difflr.groups imports this module lazily too

    model = replace_head(load_arch(arch, weights), n_out, head)
    loss_func = learner_kwargs.pop("loss_func", F.cross_entropy)
    learn = Learner(model, data, loss_func=loss_func, **learner_kwargs)
    if weights is not None:
        learn.freeze()
    return learn
