"""Tests for difflr.groups.splitters: the built-in splitters of torchvision and timm backbones."""

from __future__ import annotations

import doctest
import functools
import itertools
import pickle
import sys
import types

import lightning.pytorch as pl
import pytest
import torch
import torchvision.models as tvm
from torch import nn

import difflr.groups.splitters
from difflr.groups.blocks import BlockSplitter
from difflr.groups.layers import LayerGroup
from difflr.groups.splitters import (
    default_splitter,
    describe_group,
    find_splitter,
    resnet_splitter,
    split_model,
)

RESNET_NAMES = ["0.stem", "1.layer1", "2.layer2", "3.layer3", "4.layer4", "5.head"]
STAGE_NAMES = ["0.stem", "1.stage1", "2.stage2", "3.stage3", "4.stage4", "5.head"]
REGNET_NAMES = ["0.stem", "1.block1", "2.block2", "3.block3", "4.block4", "5.head"]
SHUFFLENET_NAMES = ["0.stem", "1.stage2", "2.stage3", "3.stage4", "4.head"]

# name, expected group names, modules/params of the stem group, of the head group, input size.
FAMILIES = [
    ("resnet18", RESNET_NAMES, ["conv1", "bn1"], ["fc"], 32),
    ("resnext50_32x4d", RESNET_NAMES, ["conv1", "bn1"], ["fc"], 32),
    ("convnext_tiny", STAGE_NAMES, ["features.0"], ["classifier"], 32),
    ("efficientnet_b0", STAGE_NAMES, ["features.0", "features.1"], ["classifier"], 32),
    ("efficientnet_v2_s", STAGE_NAMES, ["features.0", "features.1"], ["classifier"], 32),
    ("mobilenet_v2", STAGE_NAMES, ["features.0", "features.1"], ["classifier"], 32),
    ("mobilenet_v3_small", STAGE_NAMES, ["features.0"], ["classifier"], 32),
    ("regnet_y_400mf", REGNET_NAMES, ["stem"], ["fc"], 32),
    ("densenet121", STAGE_NAMES, ["features.conv0", "features.norm0"], ["classifier"], 32),
    ("vgg11", STAGE_NAMES, ["features.0"], ["classifier"], 32),
    (
        "vit_b_16",
        STAGE_NAMES,
        ["conv_proj", "class_token", "encoder.pos_embedding"],
        ["encoder.ln", "heads"],
        224,
    ),
    ("swin_t", STAGE_NAMES, ["features.0"], ["norm", "head"], 224),
    ("shufflenet_v2_x0_5", SHUFFLENET_NAMES, ["conv1"], ["fc"], 32),
    ("mnasnet0_5", STAGE_NAMES, [f"layers.{i}" for i in range(8)], ["classifier"], 32),
]
FAMILY_IDS = [family[0] for family in FAMILIES]


@functools.cache
def _built(name: str) -> nn.Module:
    """One randomly initialised model per name, shared by the tests that only read it."""
    torch.manual_seed(0)
    return tvm.get_model(name, weights=None).eval()


def _ids_of(model: nn.Module, paths: list[str]) -> set[int]:
    """Ids of the parameters of the submodules or parameters at ``paths``."""
    ids = set()
    for path in paths:
        try:
            ids.update(id(p) for p in model.get_submodule(path).parameters())
        except AttributeError:
            ids.add(id(model.get_parameter(path)))
    return ids


def _ids(group: LayerGroup) -> set[int]:
    return {id(p) for p in group.params}


def _first_call_order(model: nn.Module, x: torch.Tensor) -> dict[int, int]:
    """Param id -> rank of the first forward call of the module that owns it.

    Some modules' weights are used by their parent without calling them (the out_proj of
    nn.MultiheadAttention, Swin's attention projections): those count as their parent's call.
    """
    rank_of_path: dict[str, int] = {}
    counter = itertools.count()
    handles = []
    for path, module in model.named_modules():

        def record(_module: nn.Module, _args: object, path: str = path) -> None:
            rank_of_path.setdefault(path, next(counter))

        handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    order = {}
    for name, p in model.named_parameters():
        parts = name.split(".")[:-1]
        while ".".join(parts) not in rank_of_path:
            parts.pop()
        order[id(p)] = rank_of_path[".".join(parts)]
    return order


# --------------------------------------------------------------------------------------------
# Splitters of the torchvision families
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "names", "stem", "head", "size"), FAMILIES, ids=FAMILY_IDS)
def test_split_model_finds_the_family_groups_and_covers_every_param_once(
    name: str, names: list[str], stem: list[str], head: list[str], size: int
) -> None:
    model = _built(name)
    groups = split_model(model)  # no splitter, no model_splits(): find_splitter is used
    assert [g.name for g in groups] == names
    grouped = [id(p) for g in groups for p in g.params]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert set(grouped) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize(("name", "names", "stem", "head", "size"), FAMILIES, ids=FAMILY_IDS)
def test_head_group_is_last_and_holds_exactly_the_classifier(
    name: str, names: list[str], stem: list[str], head: list[str], size: int
) -> None:
    model = _built(name)
    groups = split_model(model)
    assert groups[-1].name.endswith(".head")
    assert _ids(groups[-1]) == _ids_of(model, head)


@pytest.mark.parametrize(("name", "names", "stem", "head", "size"), FAMILIES, ids=FAMILY_IDS)
def test_stem_group_is_first_and_holds_exactly_the_input_layers(
    name: str, names: list[str], stem: list[str], head: list[str], size: int
) -> None:
    model = _built(name)
    groups = split_model(model)
    assert groups[0].name == "0.stem"
    assert _ids(groups[0]) == _ids_of(model, stem)


@pytest.mark.parametrize(("name", "names", "stem", "head", "size"), FAMILIES, ids=FAMILY_IDS)
def test_groups_run_in_forward_order(
    name: str, names: list[str], stem: list[str], head: list[str], size: int
) -> None:
    model = _built(name)
    order = _first_call_order(model, torch.randn(1, 3, size, size))
    groups = split_model(model)
    for earlier, later in itertools.pairwise(groups):
        assert max(order[id(p)] for p in earlier.params) < min(order[id(p)] for p in later.params)


def test_resnet_splitter_gives_the_original_six_groups() -> None:
    model = _built("resnet18")
    groups = split_model(model, resnet_splitter)
    assert [g.name for g in groups] == RESNET_NAMES
    assert _ids(groups[0]) == _ids_of(model, ["conv1", "bn1"])
    assert _ids(groups[2]) == _ids_of(model, ["layer2"])


def test_wide_resnet_is_split_like_resnet() -> None:
    model = tvm.wide_resnet50_2(weights=None)
    assert [g.name for g in split_model(model)] == RESNET_NAMES


def test_resnet_splitter_names_the_missing_modules_of_a_non_resnet() -> None:
    with pytest.raises(TypeError, match=r"Sequential lacks conv1, bn1, layer1"):
        resnet_splitter(nn.Sequential(nn.Linear(2, 2)))


def test_resnet_with_identity_head_has_no_head_group() -> None:
    model = tvm.resnet18(weights=None)
    model.fc = nn.Identity()
    assert [g.name for g in split_model(model)] == RESNET_NAMES[:-1]


def test_frozen_params_stay_in_their_groups() -> None:
    model = tvm.resnet18(weights=None)
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    groups = split_model(model)
    assert _ids(groups[1]) == _ids_of(model, ["layer1"])


@pytest.mark.parametrize(("num_layers", "blocks_per_stage"), [(5, [2, 1, 1, 1]), (2, [1, 1])])
def test_vit_blocks_are_cut_into_at_most_four_near_equal_stages(
    num_layers: int, blocks_per_stage: list[int]
) -> None:
    model = tvm.VisionTransformer(
        image_size=32, patch_size=16, num_layers=num_layers, num_heads=2, hidden_dim=8, mlp_dim=16
    )
    groups = split_model(model)
    stages = groups[1:-1]
    assert [g.name for g in stages] == [f"{k}.stage{k}" for k in range(1, len(stages) + 1)]
    block_size = len(list(model.encoder.layers[0].parameters()))
    assert [len(g.params) // block_size for g in stages] == blocks_per_stage


# --------------------------------------------------------------------------------------------
# Backbones inside wrappers
# --------------------------------------------------------------------------------------------


class _LitClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tvm.resnet18(weights=None)
        self.loss = nn.CrossEntropyLoss()


class _BackboneAndHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = tvm.mobilenet_v3_small(weights=None)
        self.backbone.classifier = nn.Identity()
        self.classifier = nn.Linear(576, 3)


def test_backbone_in_sequential_is_found_and_extra_head_joins_head_group() -> None:
    extra = nn.Linear(1000, 10)
    model = nn.Sequential(tvm.resnet18(weights=None), extra)
    groups = split_model(model)
    assert [g.name for g in groups] == RESNET_NAMES
    assert _ids(groups[-1]) == _ids_of(model, ["0.fc", "1"])


def test_layers_registered_before_the_backbone_join_the_stem() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, kernel_size=1), tvm.resnet18(weights=None))
    groups = split_model(model)
    assert [g.name for g in groups] == RESNET_NAMES
    assert _ids(groups[0]) == _ids_of(model, ["0", "1.conv1", "1.bn1"])


def test_backbone_held_by_a_lightning_module_is_found() -> None:
    module = _LitClassifier()
    groups = split_model(module)
    assert [g.name for g in groups] == RESNET_NAMES
    assert _ids(groups[-1]) == _ids_of(module, ["model.fc"])


def test_backbone_attribute_with_identity_classifier_gets_the_wrapper_head() -> None:
    model = _BackboneAndHead()
    groups = split_model(model)
    assert [g.name for g in groups] == STAGE_NAMES
    assert _ids(groups[-1]) == _ids_of(model, ["classifier"])


def test_nested_wrappers_are_searched() -> None:
    model = nn.Sequential(nn.Sequential(_BackboneAndHead()))
    assert [g.name for g in split_model(model)] == STAGE_NAMES


def test_found_splitter_pickles_and_says_what_it_found() -> None:
    model = _LitClassifier()
    splitter = find_splitter(model)
    assert "resnet" in repr(splitter) and "'model'" in repr(splitter)
    restored = pickle.loads(pickle.dumps(splitter))
    assert list(restored(model)) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def test_found_splitter_applied_to_another_model_says_to_call_find_splitter() -> None:
    splitter = find_splitter(_LitClassifier())
    with pytest.raises(ValueError, match="call find_splitter"):
        splitter(nn.Sequential(nn.Linear(2, 2)))


def test_unknown_model_has_no_splitter_and_stays_one_group() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_splitter(model) is None
    with pytest.warns(UserWarning, match="found no layer groups"):
        assert len(split_model(model)) == 1


def test_two_backbones_are_ambiguous_so_no_splitter() -> None:
    model = nn.ModuleDict({"a": tvm.resnet18(weights=None), "b": tvm.mobilenet_v2(weights=None)})
    assert find_splitter(model) is None


def test_find_splitter_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"needs an nn\.Module, got str"):
        find_splitter("resnet18")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


def test_timm_model_is_split_with_its_coarse_group_matcher() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    groups = split_model(model)
    assert [g.name for g in groups] == RESNET_NAMES
    assert _ids(groups[-1]) == _ids_of(model, ["fc"])


class _TimmLike(nn.Module):
    """A model with timm's grouping interface, for the stand-in timm below."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, kernel_size=3)
        self.blocks = nn.Sequential(nn.Conv2d(4, 4, kernel_size=1), nn.Conv2d(4, 4, kernel_size=1))
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        return {"stem": r"^stem", "blocks": r"^blocks\.(\d+)", "coarse": coarse}

    def get_classifier(self) -> nn.Module:
        return self.fc


def _fake_group_parameters(module: nn.Module, matcher: dict[str, object]) -> dict[int, list[str]]:
    # The shape of timm.models.group_parameters' answer: layer id -> parameter names, stem first,
    # a trailing norm merged into the last block, unmatched parameters (the classifier) last.
    assert matcher["coarse"] is True
    return {
        0: ["stem.weight", "stem.bias"],
        1: ["blocks.0.weight", "blocks.0.bias"],
        2: ["blocks.1.weight", "blocks.1.bias", "norm.weight", "norm.bias"],
        3: ["fc.weight", "fc.bias"],
    }


def test_timm_groups_are_named_stem_blocks_head(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timm = types.ModuleType("timm")
    fake_models = types.ModuleType("timm.models")
    fake_models.group_parameters = _fake_group_parameters
    fake_timm.models = fake_models
    monkeypatch.setitem(sys.modules, "timm", fake_timm)
    monkeypatch.setitem(sys.modules, "timm.models", fake_models)

    model = nn.Sequential(_TimmLike(), nn.Linear(2, 2))  # found inside a wrapper too
    groups = split_model(model)
    assert [g.name for g in groups] == ["0.stem", "1.blocks_0", "2.blocks_1", "3.head"]
    assert _ids(groups[2]) == _ids_of(model, ["0.blocks.1", "0.norm"])
    assert _ids(groups[-1]) == _ids_of(model, ["0.fc", "1"])


def test_model_with_group_matcher_but_no_timm_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    assert find_splitter(_TimmLike()) is None


# --------------------------------------------------------------------------------------------
# The lookup: specific splitters first, then the repeated-blocks rule, then one group + warning
# --------------------------------------------------------------------------------------------


class _Blocks(nn.Module):
    """Embeddings, three blocks of one class in a ModuleList, a head: no known architecture."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3)
        )
        self.head = nn.Linear(8, 2)


def test_a_model_of_repeated_blocks_is_split_by_the_general_rule() -> None:
    model = _Blocks()
    groups = split_model(model)
    assert [g.name for g in groups] == ["0.stem", "1.block0", "2.block1", "3.block2", "4.head"]
    assert _ids(groups[0]) == _ids_of(model, ["embed"])
    assert _ids(groups[2]) == _ids_of(model, ["blocks.1"])
    assert repr(default_splitter(model)).startswith("BlockSplitter(")


def test_a_known_architecture_wins_over_the_general_rule() -> None:
    # resnet18's layer1..layer4 are also a run of stages; its own splitter still decides.
    model = _built("resnet18")
    assert default_splitter(model) == find_splitter(model)
    assert [g.name for g in split_model(model)] == RESNET_NAMES


def test_model_splits_wins_over_the_general_rule() -> None:
    class WithSplits(_Blocks):
        def model_splits(self) -> list[nn.Module]:
            return [nn.ModuleList([self.embed, self.blocks]), self.head]

    assert len(split_model(WithSplits())) == 2


def test_no_structure_means_one_group_and_a_warning_that_says_how_to_pass_a_splitter() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="found no layer groups in Sequential") as record:
        groups = split_model(model)
    assert len(groups) == 1
    message = str(record[0].message)
    assert "splitter=lambda m:" in message and "BlockSplitter(trunk=" in message
    assert "model_splits()" in message
    assert record[0].filename == __file__  # points at the caller's line, not at difflr


def test_a_given_splitter_or_a_structure_gives_no_warning(recwarn: pytest.WarningsRecorder) -> None:
    split_model(_Blocks())
    split_model(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), lambda m: [m[0], m[1]])
    assert not [w for w in recwarn if "found no layer groups" in str(w.message)]


# --------------------------------------------------------------------------------------------
# describe_group
# --------------------------------------------------------------------------------------------


def test_describe_group_names_the_fewest_modules_and_collapses_numbered_ones() -> None:
    model = _Blocks()
    groups = split_model(model, BlockSplitter(block_groups=1))
    assert [describe_group(model, g) for g in groups] == ["embed", "blocks", "head"]
    groups = split_model(
        model,
        lambda m: [
            [*m.embed.parameters(), *m.blocks[:2].parameters()],
            [*m.blocks[2].parameters(), *m.head.parameters()],
        ],
    )
    assert describe_group(model, groups[0]) == "embed, blocks.0-1"
    assert describe_group(model, groups[1]) == "blocks.2, head"


def test_describe_group_lists_loose_parameters_and_truncates() -> None:
    model = tvm.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16
    )
    stem = split_model(model)[0]
    assert describe_group(model, stem) == "conv_proj, class_token, encoder.pos_embedding"
    assert describe_group(model, stem, limit=1) == "conv_proj + 2 more"
    whole = split_model(model, lambda m: [m])[0]
    assert describe_group(model, whole) == "(all of VisionTransformer)"


def test_the_docstring_examples_run() -> None:
    results = doctest.testmod(difflr.groups.splitters)
    assert results.attempted > 0 and results.failed == 0
