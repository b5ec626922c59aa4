"""Tests for difflr.demos (glyphs, digits, backbone): the glyph source, the domain transform, the
backbone, the cache."""

from __future__ import annotations

import dataclasses
import doctest
import os
import random
import string
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import difflr
from difflr import vision_learner
from difflr.demos import backbone, digits, glyphs
from difflr.demos.backbone import (
    CACHE_ENV,
    TUTORIAL_PRETRAIN,
    PretrainConfig,
    PretrainingCacheError,
    SlimResNet,
    cache_file,
    default_cache_dir,
    load_pretrained,
    pretrained_backbone,
)
from difflr.demos.digits import (
    AugmentedImages,
    digit_loaders,
    draw_shots,
    random_affine,
    to_input,
    uci_digits,
)
from difflr.demos.glyphs import FONTS, GlyphConfig, glyph_classes, render_glyphs
from difflr.groups.splitters import split_model
from difflr.vision import resnet_splitter
from tests.helpers import quiet

SMALL_GLYPHS = GlyphConfig(chars="abcdo", merge="", fonts=FONTS[:3], per_class=6)
# A pretraining of about a second: 4 classes, 2 fonts, a 4-channel ResNet, one epoch.
TINY = PretrainConfig(
    glyphs=GlyphConfig(chars="0Ol1", merge="", fonts=FONTS[:2], per_class=12),
    widths=(4, 4, 4, 4),
    epochs=1,
    batch_size=16,
    n_valid=8,
)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def test_rendering_is_deterministic_from_the_seed() -> None:
    first = render_glyphs(SMALL_GLYPHS)
    again = render_glyphs(SMALL_GLYPHS)
    other = render_glyphs(dataclasses.replace(SMALL_GLYPHS, seed=1))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_rendered_images_are_in_the_uci_domain() -> None:
    levels, labels = render_glyphs(SMALL_GLYPHS)
    uci, _ = uci_digits()
    assert levels.dtype == uci.dtype == torch.uint8
    assert levels.shape == (30, 8, 8) and uci.shape[1:] == (8, 8)
    assert int(levels.max()) <= 16 and int(uci.max()) == 16
    assert torch.bincount(labels).tolist() == [6] * 5  # exactly per_class of each class
    # Size-normalised as UCI's digits are: the longer side spans (almost) the whole box.
    on = levels > 0
    extent = torch.maximum(on.any(2).sum(1), on.any(1).sum(1))
    assert int(extent.min()) >= 7
    # Ink: the mean on-pixel count per image is that of handwritten digits within 35 %.
    ink, uci_ink = levels.float().sum((1, 2)).mean(), uci.float().sum((1, 2)).mean()
    assert abs(float(ink / uci_ink) - 1) < 0.35


def test_levels_count_the_on_pixels_of_4x4_blocks_of_a_32x32_bitmap() -> None:
    from difflr.demos.glyphs import _to_levels

    ink = torch.zeros(1, 1, 64, 64)
    ink[..., :8, :8] = 1  # a 4x4 block of the 32x32 bitmap: the top-left cell is full
    ink[..., 8:10, 8:10] = 1  # one bitmap pixel: level 1 in cell (1, 1)
    ink[..., 20, 20] = 1  # a quarter of a bitmap pixel: below the majority, dropped
    levels = _to_levels(ink)
    expected = torch.zeros(1, 8, 8, dtype=torch.uint8)
    expected[0, 0, 0], expected[0, 1, 1] = 16, 1
    assert torch.equal(levels, expected)


def test_merged_letters_share_their_capitals_label() -> None:
    config = GlyphConfig(chars="cCab", merge="c", fonts=FONTS[:1], per_class=2)
    assert glyph_classes(config) == ["C", "a", "b"]
    assert torch.bincount(render_glyphs(config)[1]).tolist() == [2, 2, 2]
    assert len(glyph_classes(GlyphConfig())) == 62 - 10  # the default merges ten letters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chars": "aa"}, "distinct"),
        ({"chars": "ab", "merge": "c"}, "not in chars"),
        ({"per_class": 0}, "per_class must be an int >= 1, got 0"),
        ({"stroke": (2, 1)}, "stroke"),
        ({"fill": (0.5, 1.2)}, "fill"),
    ],
)
def test_glyph_config_rejects_bad_values_and_says_why(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GlyphConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"epochs": 0}, ValueError, "epochs must be an int >= 1, got 0"),
        ({"batch_size": 1.5}, TypeError, "batch_size must be an int, got 1.5"),
        ({"lr_max": 0.0}, ValueError, "lr_max"),
        ({"widths": (8, 8, 8)}, ValueError, "widths must be 4 positive ints"),
        ({"n_valid": -1}, ValueError, "n_valid must be >= 0"),
    ],
)
def test_pretrain_config_rejects_bad_values_and_says_why(
    kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        PretrainConfig(**kwargs)


def test_an_unknown_font_names_the_folder_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"not in .*fonts.*FONTS"):
        render_glyphs(GlyphConfig(chars="a", merge="", fonts=("Comic Sans",), per_class=1))


# --------------------------------------------------------------------------------------------
# The domain transform
# --------------------------------------------------------------------------------------------


def test_to_input_is_bilinear_upsampling_normalised_with_the_source_statistics() -> None:
    # The constants are the default source's (52,000 glyphs); a smaller render of the same
    # distribution agrees to 0.005. No handwritten digit's statistic enters the input.
    levels, _ = render_glyphs(GlyphConfig(per_class=40))
    at_8 = to_input(levels, size=8)
    assert abs(float(at_8.mean())) < 0.005 / 0.38 and abs(float(at_8.std()) - 1) < 0.005 / 0.38
    digits, _ = uci_digits()
    assert abs(float(to_input(digits, size=8).mean())) > 0.05  # the target's own are not used
    inner = torch.zeros(4, 8, 8, dtype=torch.uint8)  # a blank border: no padding effect
    inner[:, 1:-1, 1:-1] = torch.randint(
        0, 17, (4, 6, 6), generator=torch.Generator().manual_seed(0)
    )
    upsampled = F.interpolate(inner.float()[:, None] / 16, size=16, mode="bilinear")
    expected = (upsampled - difflr.demos.digits.PIXEL_MEAN) / difflr.demos.digits.PIXEL_STD
    torch.testing.assert_close(to_input(inner), expected)


def test_random_affine_with_no_range_is_the_identity() -> None:
    theta = random_affine(3, rotation=0, scale=0, shift=0)
    torch.testing.assert_close(theta, torch.eye(2, 3).expand(3, 2, 3))
    moved = random_affine(50, generator=torch.Generator().manual_seed(0))
    assert float(moved[:, :, 2].abs().max()) <= 0.15
    assert not torch.allclose(moved, torch.eye(2, 3).expand(50, 2, 3))


def test_to_input_rejects_images_of_another_size() -> None:
    with pytest.raises(ValueError, match=r"shape \(n, 8, 8\), got \(2, 16, 16\)"):
        to_input(torch.zeros(2, 16, 16))


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------


def test_draw_shots_takes_shots_of_each_class_and_leaves_the_rest() -> None:
    labels = torch.tensor([0, 1, 2] * 4)  # four of each class
    train, rest = draw_shots(labels, 3, torch.Generator().manual_seed(0))
    assert np.bincount(labels[train].numpy()).tolist() == [3, 3, 3]
    assert sorted(train.tolist() + rest.tolist()) == list(range(12))
    assert rest.tolist() == sorted(rest.tolist())
    again, _ = draw_shots(labels, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again, train)
    with pytest.raises(ValueError, match=r"class 0 has 4 images, not more than shots=4"):
        draw_shots(labels, 4)
    with pytest.raises(ValueError, match="shots must be an int >= 1, got 0"):
        draw_shots(labels, 0)


def test_augmented_images_without_augmentation_are_to_input() -> None:
    levels = torch.randint(0, 17, (5, 8, 8), generator=torch.Generator().manual_seed(0))
    dataset = AugmentedImages(levels, torch.arange(5))
    x, y = dataset.collate([4, 0])
    assert torch.equal(x, to_input(levels[[4, 0]])) and y.tolist() == [4, 0]
    moved, _ = AugmentedImages(levels, torch.arange(5), (10.0, 0.1, 0.15)).collate([4, 0])
    assert moved.shape == x.shape and not torch.equal(moved, x)
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        AugmentedImages(levels, torch.arange(4))


def test_digit_loaders_train_on_the_shots_and_validate_on_every_other_digit() -> None:
    train_dl, valid_dl = digit_loaders(shots=4, batch_size=8, batches_per_epoch=3, augment=None)
    batches = list(train_dl)
    assert len(train_dl) == len(batches) == 3 and batches[0][0].shape == (8, 1, 16, 16)
    x_valid, y_valid = valid_dl.dataset.tensors
    assert len(y_valid) == 1797 - 40
    levels, labels = uci_digits()
    train, rest = draw_shots(labels, 4, torch.Generator().manual_seed(0))  # the default seed
    assert torch.equal(x_valid, to_input(levels[rest])) and torch.equal(y_valid, labels[rest])
    train_inputs = to_input(levels[train])
    for x, y in batches:  # without augmentation, every training input is one of the shots
        for xi, yi in zip(x, y):
            match = (train_inputs == xi).flatten(1).all(1)
            assert match.any() and labels[train][match][0] == yi


def test_the_tutorial_pretraining_is_the_default_made_smaller() -> None:
    default = PretrainConfig()
    assert TUTORIAL_PRETRAIN.widths == default.widths  # the same backbone, less pretraining
    assert TUTORIAL_PRETRAIN.glyphs.chars == default.glyphs.chars
    work = TUTORIAL_PRETRAIN.glyphs.per_class * TUTORIAL_PRETRAIN.epochs
    assert work * 4 <= default.glyphs.per_class * default.epochs
    assert TUTORIAL_PRETRAIN.key() != default.key()


def test_slim_resnet_has_the_six_groups_of_the_original_example() -> None:
    model = SlimResNet((4, 8, 8, 16), n_out=7)
    names = [group.name for group in split_model(model, resnet_splitter)]
    assert names == ["0.stem", "1.layer1", "2.layer2", "3.layer3", "4.layer4", "5.head"]
    data = DataLoader(TensorDataset(torch.zeros(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)))
    learn = vision_learner(model, (data, None), n_out=10, checkpoint=False, **quiet("."))
    assert [g.name for g in learn.splits] == names  # found without a splitter argument
    assert learn.model.eval()(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def test_cache_key_follows_the_settings_and_the_library_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = TINY.key()
    assert (
        PretrainConfig(**{f.name: getattr(TINY, f.name) for f in dataclasses.fields(TINY)}).key()
        == key
    )
    changed = [
        dataclasses.replace(TINY, epochs=2),
        dataclasses.replace(TINY, widths=(4, 4, 4, 8)),
        dataclasses.replace(TINY, glyphs=dataclasses.replace(TINY.glyphs, seed=1)),
        dataclasses.replace(TINY, glyphs=dataclasses.replace(TINY.glyphs, elastic=0.0)),
    ]
    assert len({config.key() for config in changed} | {key}) == 5
    monkeypatch.setattr(difflr, "__version__", "999.0")
    assert TINY.key() != key


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "difflr"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert cache_file(TINY).parent == tmp_path / "mine"
    assert cache_file(TINY).name == f"glyph_resnet_{TINY.key()}.pt"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("cache")
    return folder, pretrained_backbone(TINY, cache_dir=folder, progress=False)


def test_the_backbone_is_built_once_then_loaded(built: tuple[Path, torch.nn.Module]) -> None:
    folder, model = built
    assert model.pretraining["loaded_from_cache"] is False
    name = cache_file(TINY, folder).name
    assert sorted(p.name for p in folder.iterdir()) == [name, name + ".lock"]  # no temp file
    again = pretrained_backbone(TINY, cache_dir=folder, progress=False)
    assert again.pretraining["loaded_from_cache"] is True
    assert _same_state(model, again)
    assert again.pretraining["classes"] == ["0", "O", "l", "1"]
    assert again.fc.out_features == 4


def test_the_file_holds_only_tensors_and_plain_values(built: tuple[Path, torch.nn.Module]) -> None:
    folder, _ = built
    payload = torch.load(cache_file(TINY, folder), weights_only=True)
    assert payload["key"] == TINY.key()
    assert payload["meta"]["config"] == TINY.as_dict()
    assert payload["meta"]["difflr"] == difflr.__version__


def test_a_second_builder_waits_for_the_first_and_loads_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two notebooks (or jobs) asking for the same backbone at once pretrain it once."""
    builds = []
    real_pretrain = backbone.pretrain

    def counted(config, progress=True):
        builds.append(threading.current_thread().name)
        time.sleep(0.3)  # the second caller arrives while the first builds
        return real_pretrain(config, progress)

    monkeypatch.setattr(backbone, "pretrain", counted)
    results: dict[str, torch.nn.Module] = {}

    def ask(name: str) -> None:
        results[name] = pretrained_backbone(TINY, cache_dir=tmp_path, progress=False)

    threads = [threading.Thread(target=ask, args=(name,), name=name) for name in "ab"]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert builds == ["a"]
    assert results["a"].pretraining["loaded_from_cache"] is False
    assert results["b"].pretraining["loaded_from_cache"] is True
    assert _same_state(results["a"], results["b"])


def test_a_corrupt_cache_file_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    path = cache_file(TINY, tmp_path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(
        PretrainingCacheError, match=r"not a complete pretrained backbone.*rebuild=True"
    ):
        load_pretrained(path)
    with pytest.warns(UserWarning, match="Pretraining again"):
        model = pretrained_backbone(TINY, cache_dir=tmp_path, progress=False)
    assert model.pretraining["loaded_from_cache"] is False
    assert load_pretrained(path, TINY)[1]["key"] == TINY.key()


def test_foreign_and_mismatched_files_are_refused_with_the_reason(
    tmp_path: Path, built: tuple[Path, torch.nn.Module]
) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(PretrainingCacheError, match="not a difflr pretraining file"):
        load_pretrained(foreign)
    # A pickle that would run code is refused by weights_only, never executed.
    torch.save({"format": "difflr.pretraining/1", "payload": os.system}, foreign)
    with pytest.raises(
        PretrainingCacheError, match=r"not a plain pretrained backbone.*(?i:unsupported global)"
    ):
        load_pretrained(foreign)
    folder, _ = built
    other = dataclasses.replace(TINY, epochs=2)
    with pytest.raises(PretrainingCacheError, match="other settings"):
        load_pretrained(cache_file(TINY, folder), other)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(
    tmp_path: Path, built: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = built
    good = cache_file(TINY, folder)
    target = tmp_path / good.name
    target.write_bytes(good.read_bytes())

    def disk_full(obj: object, file: object, *args: object, **kwargs: object) -> None:
        file.write(b"half a file")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        pretrained_backbone(TINY, cache_dir=tmp_path, rebuild=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name, good.name + ".lock"]
    assert target.read_bytes() == good.read_bytes()


def test_the_docstring_examples_run() -> None:
    attempted = failed = 0
    for module in (backbone, digits, glyphs):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        attempted, failed = attempted + result.attempted, failed + result.failed
    assert attempted >= 3 and failed == 0


def test_the_default_source_is_letters_and_printed_digits() -> None:
    config = PretrainConfig().glyphs
    assert set(string.ascii_letters + string.digits) == set(config.chars)


def test_progress_names_the_cache_file_under_home_as_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    pretrained_backbone(TINY, cache_dir=tmp_path / "cache", progress=True)
    out = capsys.readouterr().out
    assert f"saved ~/cache/{cache_file(TINY, tmp_path / 'cache').name}" in out
    assert str(tmp_path) not in out


def test_building_the_backbone_leaves_the_callers_random_streams_as_they_were(
    tmp_path: Path,
) -> None:
    # A notebook seeds, builds (or loads) the backbone, then trains: a cold and a warm run must
    # compute the same thing after it.
    def draws() -> tuple[float, float, float]:
        return torch.rand(1).item(), float(np.random.rand()), random.random()

    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = draws()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    pretrained_backbone(TINY, cache_dir=tmp_path, progress=False)  # built: pretrains
    assert draws() == expected
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    pretrained_backbone(TINY, cache_dir=tmp_path, progress=False)  # loaded
    assert draws() == expected


@pytest.mark.parametrize(
    "meta", [None, {}, {"config": {"widths": "wide"}, "classes": 4}], ids=["none", "empty", "bad"]
)
def test_a_cache_file_with_a_missing_or_malformed_meta_is_an_unusable_cache_file(
    tmp_path: Path, built: tuple[Path, torch.nn.Module], meta: Any
) -> None:
    folder, _ = built
    good = torch.load(cache_file(TINY, folder), weights_only=True)
    path = cache_file(TINY, tmp_path)
    payload = {k: v for k, v in good.items() if k != "difflr.checksum"}
    if meta is None:
        del payload["meta"]
    else:
        payload["meta"] = meta
    torch.save(payload, path)
    with pytest.raises(PretrainingCacheError, match=r"no usable metadata.*rebuild=True"):
        load_pretrained(path, TINY)
