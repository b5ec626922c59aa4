"""Tests for difflr.vision: heads, model loading (weights=None only) and vision_learner."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from difflr import vision
from difflr.groups.layers import LayerGroup
from difflr.groups.splitters import split_model
from difflr.vision import create_head, load_arch, replace_head, vision_learner
from tests.helpers import quiet
from tests.test_splitters import RESNET_NAMES


def _ids(group: LayerGroup) -> set[int]:
    return {id(p) for p in group.params}


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
    ("kwargs", "exc", "message"),
    [
        ({"n_in": 0, "n_out": 2}, ValueError, "n_in must be an int >= 1, got 0"),
        ({"n_in": 8, "n_out": 2.0}, TypeError, "n_out must be an int, got 2.0"),
        ({"n_in": 8, "n_out": 2, "hidden": -1}, ValueError, "hidden must be an int >= 1, got -1"),
        (
            {"n_in": 8, "n_out": 2, "dropout": 1.0},
            ValueError,
            r"dropout must be in \[0, 1\) \(a probability\), got 1.0",
        ),
    ],
)
def test_create_head_rejects_bad_sizes(kwargs: dict, exc: type, message: str) -> None:
    with pytest.raises(exc, match=message):
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
    with pytest.raises(
        ValueError, match=r"n_out must be an int >= 1 \(a number of outputs\), got 0"
    ):
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
        **quiet(tmp_path),
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
        **quiet(tmp_path),
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
        vision_learner("resnet18", _image_loaders(), n_out=2, weights="DEFAULT", **quiet("."))


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
        limit_train_batches=1,
        **quiet(tmp_path),
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
