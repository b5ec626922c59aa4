"""Splitters: how a model is cut into layer groups when the user does not say.

``split_model(model, splitter=None)`` asks, in order: the ``splitter`` given; the model's own
``model_splits()`` (the method the original ParametersSplitsModule example defined); a built-in
splitter for a recognised architecture (`find_splitter`); the repeated-blocks rule
(`difflr.groups.blocks.BlockSplitter`: a group before the trunk of blocks, one per block, one after it);
else, with a warning that says how to pass a splitter, the whole model is one group.

`find_splitter` recognises the torchvision classification families (ResNet/ResNeXt/Wide-ResNet,
ConvNeXt, EfficientNet v1/v2, MobileNet v2/v3, RegNet, DenseNet, VGG, ViT, Swin, ShuffleNetV2,
MNASNet), every timm model that declares its own ``group_matcher`` (when timm is installed) and
every Hugging Face transformers model whose config counts its layers (BERT, RoBERTa, DistilBERT,
GPT-2, LLaMA-style decoders, ViT, ...: ``embeddings``, ``layer0`` .. ``layer{n-1}``, ``head``; see
`difflr.groups.hf`). It also finds such a backbone inside a wrapper (an ``nn.Sequential``, a ``LightningModule`` or any
module holding it as an attribute). The groups it returns go stem first, stages in forward order,
head last, and cover every parameter of the model exactly once.

Most families are cut where the feature map's resolution halves, as ResNet's ``layer1..layer4``
are, so a discriminative ``slice(lo, hi)`` spreads over comparable stages whatever the backbone.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torchvision.models as tvm
from torch import nn
from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2

from difflr.groups.adapters import mark_fixed
from difflr.groups.blocks import BlockSplitter, chunks, cut_along_trunk, find_trunk, trunk_at
from difflr.groups.hf import GROUP_NAMES as TRANSFORMERS_NAMES
from difflr.groups.hf import is_transformers_model, transformers_trunk
from difflr.groups.layers import LayerGroup, Splitter, layer_groups
from difflr.utils.checks import user_stacklevel

__all__ = [
    "FAMILIES",
    "default_splitter",
    "describe_group",
    "find_splitter",
    "resnet_splitter",
    "split_model",
    "torchvision_family",
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
    for k, blocks in enumerate(chunks(list(encoder.layers), _VIT_STAGES), 1):
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


def _transformers_groups(model: nn.Module) -> NamedGroups:
    # The layers the config counts are the trunk; what is registered before them (the
    # embeddings) is the first group, what after them (final norm, pooler, task head) the last.
    layers = transformers_trunk(model)
    assert layers is not None  # _family checked it
    return cut_along_trunk(model, trunk_at(model, layers), names=TRANSFORMERS_NAMES)


FAMILIES: tuple[tuple[str, type[nn.Module], Callable[[nn.Module], NamedGroups]], ...] = (
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
    name: grouper for name, _, grouper in FAMILIES
}
_GROUPERS["timm"] = _timm_groups
_GROUPERS["transformers"] = _transformers_groups


def torchvision_family(module: nn.Module) -> str | None:
    return next((name for name, cls, _ in FAMILIES if isinstance(module, cls)), None)


def _family(module: nn.Module) -> str | None:
    """The family name of a recognised backbone, else None."""
    family = torchvision_family(module)
    if family is None and callable(getattr(module, "group_matcher", None)) and _has_timm():
        family = "timm"
    if family is None and is_transformers_model(module) and transformers_trunk(module):
        family = "transformers"
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
    ShuffleNetV2 (``stem``, ``stage2`` .. ``stage4``, ``head``), subclasses of these; when timm
    is installed, any timm model with ``group_matcher`` (timm's coarse groups, named after
    their modules); and any Hugging Face transformers model whose config counts its layers
    (``embeddings``, ``layer0`` .. ``layer{n-1}``, ``head``: BERT, RoBERTa, DistilBERT, GPT-2,
    LLaMA-style decoders, ViT, ...). A model that is none of these but holds exactly one of them (inside an
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
# The lookup
# --------------------------------------------------------------------------------------------


def _whole_model(model: nn.Module) -> list[nn.Module]:
    return [model]


def _model_splits(model: nn.Module) -> object:
    return model.model_splits()  # type: ignore[operator]


def default_splitter(model: nn.Module) -> Splitter:
    """The splitter used when none is given, the first that applies of: ``model.model_splits``;
    `find_splitter`'s (a known architecture); `BlockSplitter` (the model has a trunk of repeated
    blocks); one that returns the whole model as one group (with a warning from `split_model`).

    Examples:
        >>> from torch import nn
        >>> block = lambda: nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        >>> default_splitter(nn.Sequential(nn.Linear(4, 8), block(), block()))
        BlockSplitter(trunk=None, block_groups=None, tied='head', names=None)
    """
    if callable(getattr(model, "model_splits", None)):
        return _model_splits
    found = find_splitter(model)
    if found is not None:
        return found
    if find_trunk(model) is not None:
        return BlockSplitter()
    return _whole_model


def split_model(model: nn.Module, splitter: Splitter | None = None) -> list[LayerGroup]:
    """Cut ``model`` into named layer groups and check that they cover it exactly once.

    The groups come from ``splitter(model)`` if given, else from `default_splitter`: the
    model's ``model_splits()``, else a built-in splitter for known architectures, else the
    repeated-blocks rule, else the whole model is one group, with a warning.

    Args:
        model: The model to split.
        splitter: ``splitter(model)`` returning the groups in forward order, as a sequence or
            as a ``{name: group}`` mapping.

    Returns:
        The layer groups, stem first, head last. Sequence groups are named ``"{i}.{class}"``;
        mapping groups ``"{i}.{key}"``. For a model with ``peft`` adapters (LoRA, ...) each
        group's base weights, which the adapter method froze, are its ``fixed`` parameters: they
        never train (`difflr.groups.adapters`).

    Raises:
        ValueError: A trainable parameter is in no group or in several; a group is empty.
        TypeError: The splitter is not callable or returned something that is not a group.

    Warns:
        UserWarning: No splitter was given and the model has no recognisable structure, so it
            is one group: discriminative LRs and freezing then have nothing to work on.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [g.name for g in split_model(model, lambda m: {"body": m[0], "head": m[2]})]
        ['0.body', '1.head']
    """
    if splitter is None:
        splitter = default_splitter(model)
        if splitter is _whole_model:
            warnings.warn(
                f"difflr found no layer groups in {type(model).__name__} (no model_splits(), no "
                "known architecture, no run of two or more blocks of one class), so it is one "
                "group and slice(lo, hi) or freeze_to() have nothing to spread over. Pass "
                "splitter=lambda m: {'body': m.body, 'head': m.head} (groups in forward order), "
                "splitter=BlockSplitter(trunk='path.to.blocks'), or define model_splits().",
                stacklevel=user_stacklevel(),
            )
    elif not callable(splitter):
        raise TypeError(
            f"splitter must be a function model -> list of groups, got {type(splitter).__name__}."
        )
    return mark_fixed(model, layer_groups(model, splitter(model)))


# --------------------------------------------------------------------------------------------
# What a group holds, for people
# --------------------------------------------------------------------------------------------


def describe_group(model: nn.Module, group: LayerGroup, limit: int = 4) -> str:
    """The modules (and loose parameters) that make up ``group``, in a few words.

    The fewest module paths whose parameters are all in the group and together are exactly the
    group; runs of numbered siblings are collapsed (``"bert.encoder.layer.0-3"``).

    Args:
        model: The model the group was cut from.
        group: One of ``split_model(model)``'s groups.
        limit: Show at most this many items, then ``"+ n more"``.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
        >>> groups = split_model(model, lambda m: {"body": m[:3], "head": m[3]})
        >>> describe_group(model, groups[0])
        '0-2'
    """
    wanted = {id(p) for p in group.params}
    # The parameters under each module path, by name: a module whose weight is tied to one
    # elsewhere (an LM head) still counts as wholly in the group that holds the tensor.
    under: dict[str, set[int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        for depth in range(len(parts)):
            under.setdefault(".".join(parts[:depth]), set()).add(id(p))
    if under.get("", set()) <= wanted:
        return f"(all of {type(model).__name__})"
    taken: list[str] = []
    covered: set[int] = set()
    for path, ids in under.items():  # a module comes before its children
        if path and ids <= wanted and not any(path.startswith(f"{t}.") for t in taken):
            taken.append(path)
            covered |= ids
    loose = [name for name, p in model.named_parameters() if id(p) in wanted - covered]
    items = _collapse_numbered(taken) + loose
    shown = ", ".join(items[:limit])
    return shown + (f" + {len(items) - limit} more" if len(items) > limit else "")


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _collapse_numbered(paths: list[str]) -> list[str]:
    """``["a.0", "a.1", "a.2", "b"]`` -> ``["a.0-2", "b"]``."""
    result: list[str] = []
    run: tuple[str, int, int] | None = None  # prefix, first, last
    for path in [*paths, None]:
        match = _NUMBERED.match(path) if path is not None else None
        if match and run and match.group(1) == run[0] and int(match.group(2)) == run[2] + 1:
            run = (run[0], run[1], int(match.group(2)))
            continue
        if run:
            result.append(f"{run[0]}{run[1]}" if run[1] == run[2] else f"{run[0]}{run[1]}-{run[2]}")
            run = None
        if match:
            run = (match.group(1), int(match.group(2)), int(match.group(2)))
        elif path is not None:
            result.append(path)
    return result
