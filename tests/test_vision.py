"""Tests for difflr.vision: architecture splitters, heads and model loading (weights=None only)."""

from __future__ import annotations

import functools
import itertools
import pickle
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from difflr import vision
from difflr.groups import LayerGroup, split_model
from difflr.vision import (
    create_head,
    find_splitter,
    load_arch,
    replace_head,
    resnet_splitter,
    vision_learner,
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
# Heads
# --------------------------------------------------------------------------------------------


def test_create_head_maps_pooled_features_to_outputs() -> None:
    head = create_head(32, 5, hidden=16)
    assert head(torch.randn(4, 32)).shape == (4, 5)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 16), (16, 5)]
    assert isinstance(head[0], nn.BatchNorm1d)


def test_create_head_without_hidden_layer_is_one_linear() -> None:
    head = create_head(32, 5, hidden=None, dropout=0.5)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 5)]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_in": 0, "n_out": 2}, "n_in must be a positive integer, got 0"),
        ({"n_in": 8, "n_out": 2.0}, "n_out must be a positive integer, got 2.0"),
        ({"n_in": 8, "n_out": 2, "hidden": -1}, "hidden must be a positive integer, got -1"),
        ({"n_in": 8, "n_out": 2, "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_create_head_rejects_bad_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_head(**kwargs)


def _tiny_vit() -> nn.Module:
    return tvm.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )


def _tiny_swin() -> nn.Module:
    return tvm.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2]
    )


HEAD_CASES = [
    *[
        (name, functools.partial(tvm.get_model, name, weights=None))
        for name in [
            "resnet18",
            "convnext_tiny",
            "efficientnet_b0",
            "mobilenet_v2",
            "mobilenet_v3_small",
            "regnet_y_400mf",
            "densenet121",
            "vgg11",
            "shufflenet_v2_x0_5",
            "mnasnet0_5",
        ]
    ],
    ("vit", _tiny_vit),
    ("swin", _tiny_swin),
]


@pytest.mark.parametrize(("name", "build"), HEAD_CASES, ids=[case[0] for case in HEAD_CASES])
def test_replace_head_gives_n_out_outputs_and_the_new_head_is_the_head_group(
    name: str, build: functools.partial
) -> None:
    model = build()
    assert replace_head(model, n_out=3) is model
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3)
    new_head_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.BatchNorm1d) for p in m.parameters()
    }
    groups = split_model(model)
    assert groups[-1].name.endswith(".head")
    assert new_head_ids <= _ids(groups[-1])


def test_replace_head_keeps_convnext_norm_and_flatten() -> None:
    model = replace_head(tvm.convnext_tiny(weights=None), n_out=4)
    assert [type(m).__name__ for m in model.classifier[:2]] == ["LayerNorm2d", "Flatten"]


def test_replace_head_uses_the_given_head_and_can_replace_a_replaced_head() -> None:
    model = tvm.resnet18(weights=None)
    custom = nn.Linear(512, 7)
    assert replace_head(model, n_out=7, head=custom).fc is custom
    replace_head(model, n_out=2)  # reads 512 features from the custom Linear
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_replace_head_without_a_linear_asks_for_a_head() -> None:
    model = tvm.resnet18(weights=None)
    model.fc = nn.Identity()
    with pytest.raises(ValueError, match="pass head="):
        replace_head(model, n_out=2)


def test_replace_head_rejects_unknown_models_and_bad_n_out() -> None:
    with pytest.raises(TypeError, match="got a Sequential"):
        replace_head(nn.Sequential(nn.Linear(2, 2)), n_out=2)
    with pytest.raises(ValueError, match="n_out must be a positive integer, got 0"):
        replace_head(tvm.resnet18(weights=None), n_out=0)


# --------------------------------------------------------------------------------------------
# load_arch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch", ["resnet18", "ResNet18", tvm.resnet18], ids=["name", "case", "builder"]
)
def test_load_arch_builds_from_a_name_or_a_builder(arch: object) -> None:
    assert isinstance(load_arch(arch), tvm.ResNet)


def test_load_arch_returns_a_module_as_is() -> None:
    model = nn.Linear(2, 2)
    assert load_arch(model) is model


def test_load_arch_unknown_name_points_to_list_models() -> None:
    with pytest.raises(ValueError, match=r"'resnet1'.*'resnet18'.*list_models\(\)"):
        load_arch("resnet1")


def test_load_arch_rejects_weights_for_a_module_and_foreign_weights() -> None:
    with pytest.raises(ValueError, match="already a Linear instance"):
        load_arch(nn.Linear(2, 2), weights="DEFAULT")
    with pytest.raises(ValueError, match="are not weights of resnet18; pass one of DEFAULT"):
        load_arch("resnet18", weights="ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="no torchvision weights enum"):
        load_arch(lambda: nn.Linear(2, 2), weights="DEFAULT")


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A torch hub dir under tmp_path, and downloads that fail the test if attempted."""

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path


def test_load_arch_with_uncached_weights_says_where_to_put_the_file(empty_hub: Path) -> None:
    with pytest.raises(RuntimeError) as raised:
        load_arch("resnet18", weights="IMAGENET1K_V1")
    message = str(raised.value)
    assert "no network access" in message
    assert "resnet18-f37072fd.pth" in message
    assert str(empty_hub / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "weights=None" in message


def test_load_arch_loads_cached_weights_without_downloading(empty_hub: Path) -> None:
    torch.manual_seed(1)
    state = tvm.shufflenet_v2_x0_5(weights=None).state_dict()
    filename = Path(tvm.ShuffleNet_V2_X0_5_Weights.DEFAULT.url).name
    (empty_hub / "checkpoints").mkdir()
    torch.save(state, empty_hub / "checkpoints" / filename)
    model = load_arch(tvm.shufflenet_v2_x0_5, weights="DEFAULT")
    assert torch.equal(model.conv1[0].weight, state["conv1.0.weight"])


def _image_loaders(n: int = 8, n_classes: int = 3) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % n_classes)
    return DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=8)


def test_vision_learner_gives_n_out_outputs_and_the_original_six_groups(tmp_path: Path) -> None:
    learn = vision_learner(
        "resnet18",
        _image_loaders(),
        n_out=3,
        path=tmp_path,
        logger=False,
        enable_progress_bar=False,
    )
    assert [g.name for g in learn.splits] == RESNET_NAMES
    assert _ids(learn.splits[-1]) == {id(p) for p in learn.model.fc.parameters()}
    assert learn.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert learn.frozen == [False] * 6  # random weights: nothing to keep, nothing frozen
    assert learn.module.loss_func is F.cross_entropy


def test_vision_learner_with_cached_weights_loads_them_and_freezes_the_body(
    empty_hub: Path, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    state = tvm.resnet18(weights=None).state_dict()
    (empty_hub / "checkpoints").mkdir()
    torch.save(state, empty_hub / "checkpoints" / Path(tvm.ResNet18_Weights.DEFAULT.url).name)
    learn = vision_learner(
        tvm.resnet18,
        _image_loaders(),
        n_out=4,
        weights="DEFAULT",
        logger=False,
        enable_progress_bar=False,
        path=tmp_path,
    )
    assert torch.equal(learn.model.conv1.weight, state["conv1.weight"])
    assert learn.frozen == [True] * 5 + [False]
    assert not learn.model.conv1.weight.requires_grad
    assert not learn.model.layer4[1].conv2.weight.requires_grad
    assert learn.model.layer4[1].bn2.weight.requires_grad  # train_bn keeps norm layers training
    assert all(p.requires_grad for p in learn.model.fc.parameters())
    assert learn.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_vision_learner_without_cached_weights_fails_before_building_a_learner(
    empty_hub: Path,
) -> None:
    with pytest.raises(RuntimeError, match="no network access"):
        vision_learner("resnet18", _image_loaders(), n_out=2, weights="DEFAULT", logger=False)


def test_vision_learner_passes_head_and_learner_kwargs_through(tmp_path: Path) -> None:
    head = nn.Linear(512, 5)

    def loss_func(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(preds, target, label_smoothing=0.1)

    learn = vision_learner(
        "resnet18",
        _image_loaders(n_classes=5),
        n_out=5,
        head=head,
        loss_func=loss_func,
        splitter=lambda m: {
            "body": [p for n, p in m.named_parameters() if not n.startswith("fc")],
            "head": m.fc,
        },
        lr=3e-4,
        wd=0.05,
        path=tmp_path,
        logger=False,
        enable_progress_bar=False,
        limit_train_batches=1,
    )
    assert learn.model.fc is head
    assert learn.module.loss_func is loss_func
    assert [g.name for g in learn.splits] == ["0.body", "1.head"]
    assert learn.lr == 3e-4 and learn.wd == 0.05
    assert learn.path == tmp_path
    assert learn.trainer_kwargs == {"enable_progress_bar": False, "limit_train_batches": 1}
    learn.fit(1)
    assert len(learn.recorder.lrs) == 1  # limit_train_batches reached the Trainer


def test_module_exports_the_public_names() -> None:
    assert set(vision.__all__) == {
        "create_head",
        "find_splitter",
        "load_arch",
        "replace_head",
        "resnet_splitter",
        "vision_learner",
    }
