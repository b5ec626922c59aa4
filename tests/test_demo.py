"""Tests for difflr.demo: a quick run end to end, its data preparation and its offline errors."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from difflr import Stage
from difflr.demo import (
    MILESTONES,
    RUN_NAMES,
    DemoError,
    draw_shots,
    format_table,
    load_data,
    main,
    make_task,
    parse_args,
)

FIGURES = [
    "source_sched",
    "source_loss",
    "scratch_lr_find",
    "scratch_sched",
    "scratch_loss",
    "transfer_lr_find",
    "transfer_head_sched",
    "transfer_head_loss",
    "transfer_unfrozen_sched",
    "transfer_unfrozen_loss",
    "stages_sched",
    "stages_loss",
]
LOG_DIRS = ["source", "scratch/draw0", "transfer_discriminative/draw0", "transfer_stage_plan/draw0"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("demo")
    return main(["--quick", "--out", str(out)]), out


def _tags(log_dir: Path) -> set[str]:
    tags: set[str] = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    return tags


def test_quick_run_writes_every_figure_as_a_png(quick_run: tuple[dict, Path]) -> None:
    results, out = quick_run
    for name in FIGURES:
        path = out / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(results["figures"]) == sorted(str(out / "figures" / f"{n}.png") for n in FIGURES)


def test_quick_run_writes_results_json_with_every_run(quick_run: tuple[dict, Path]) -> None:
    results, out = quick_run
    written = json.loads((out / "results.json").read_text())
    assert list(written["runs"]) == list(RUN_NAMES)
    for name, run in written["runs"].items():
        assert run["accuracy"] == pytest.approx(results["runs"][name]["accuracy"])
        assert len(run["accuracies"]) == 1
        assert run["epochs"] == 6
        assert run["seconds"] > 0
    assert written["settings"]["shots"] == 5
    assert 0 <= written["source"]["accuracy"] <= 1


def test_quick_run_logs_every_group_to_tensorboard(quick_run: tuple[dict, Path]) -> None:
    _, out = quick_run
    groups = ["0.stem", "1.layer1", "2.layer2", "3.layer3", "4.layer4", "5.head"]
    for log_dir in LOG_DIRS:
        tags = _tags(out / "tensorboard" / log_dir)
        assert {f"lr/{g}" for g in groups} <= tags, log_dir
        assert {f"mom/{g}" for g in groups} <= tags, log_dir
        assert "valid_loss" in tags, log_dir


def test_quick_run_learns_better_than_chance(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    chance = results["settings"]["chance"]
    assert chance == pytest.approx(0.2)
    assert results["source"]["accuracy"] > chance + 0.2
    best = max(run["accuracy"] for run in results["runs"].values())
    assert best > chance + 0.2


def test_quick_run_stage_plan_ran_the_six_milestones(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    run = results["runs"]["transfer: stage plan"]
    assert run["epochs"] == len(MILESTONES) == 6


def test_table_lists_every_run_with_its_accuracy(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    table = format_table(results)
    for name, run in results["runs"].items():
        line = next(line for line in table.splitlines() if line.startswith(name))
        assert f"{run['accuracy']:.3f}" in line


def test_milestones_are_the_original_plan() -> None:
    stages = Stage.from_milestones(MILESTONES)
    assert [s.freeze_to for s in stages] == [-1, -2, -3, -4, -5, 0]
    assert [s.epochs for s in stages] == [1] * 6
    assert stages[0].lrs(6) == [0.0] * 5 + [1e-3]
    assert stages[-1].lrs(6) == [1e-6] * 6
    assert all(s.pct_start == 0.3 for s in stages)


def test_second_load_reads_the_cache(tmp_path: Path) -> None:
    settings = parse_args(["--out", str(tmp_path)])
    first, cached_first = load_data(settings)
    second, cached_second = load_data(settings)
    assert (cached_first, cached_second) == (False, True)
    assert (tmp_path / "data" / "digits_32px.pt").is_file()
    assert first["x"].shape == (1797, 1, 32, 32)
    assert torch.equal(first["x"], second["x"]) and torch.equal(first["y"], second["y"])


def test_task_keeps_source_and_target_classes_and_test_images_apart(tmp_path: Path) -> None:
    settings = parse_args(["--out", str(tmp_path)])
    task = make_task(load_data(settings)[0], settings)
    assert task.source.x.shape[1:] == (3, 32, 32)
    assert set(task.source.y.tolist()) == set(range(5))  # digits 0-4, labels 0-4
    assert set(task.target_pool.y.tolist()) == set(task.target_test.y.tolist()) == set(range(5))
    assert len(task.source) + len(task.target_pool) + len(task.target_test) == 1797
    pool_rows = {tuple(row.tolist()) for row in task.target_pool.x[:, 0].flatten(1)}
    assert not any(tuple(row.tolist()) in pool_rows for row in task.target_test.x[:, 0].flatten(1))
    # Every draw of labelled images comes from the pool, with `shots` per class.
    shots = draw_shots(task.target_pool, 5, torch.Generator().manual_seed(0))
    assert np.bincount(shots.y.numpy()).tolist() == [5] * 5
    assert all(tuple(row.tolist()) in pool_rows for row in shots.x[:, 0].flatten(1))


def test_quick_settings_are_small_and_flags_are_validated() -> None:
    quick = parse_args(["--quick"])
    assert (quick.repeats, quick.source_epochs, quick.epoch_batches) == (1, 2, 5)
    assert quick.lr == 3e-3  # a 20-step sweep is too coarse to suggest from
    assert parse_args(["--quick", "--lr", "1e-2"]).lr == 1e-2
    full = parse_args([])
    assert (full.epochs, full.shots, full.repeats) == (6, 5, 3)
    assert (full.data, full.weights, full.lr) == ("digits", "none", None)
    assert full.out == Path("difflr_demo")
    with pytest.raises(SystemExit):
        parse_args(["--epochs", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--data", "mnist"])


def test_cifar10_without_network_says_how_to_run_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DemoError, match="needs network access once") as raised:
        main(["--quick", "--data", "cifar10", "--out", str(tmp_path)])
    assert "--data digits" in str(raised.value)
    assert not (tmp_path / "results.json").exists()


def test_cifar10_is_split_into_source_pool_and_its_own_test_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            assert download
            n = 40 if train else 20
            self.data = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), np.uint8)
            self.targets = [i % 10 for i in range(n)]

        def __len__(self) -> int:
            return len(self.targets)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    settings = parse_args(["--data", "cifar10", "--out", str(tmp_path)])
    task = make_task(load_data(settings)[0], settings)
    assert (len(task.source), len(task.target_pool), len(task.target_test)) == (20, 20, 10)
    assert task.source.x.shape[1:] == (3, 32, 32)
    assert float(task.source.x.abs().max()) < 10  # normalised, not raw 0..255
    assert (tmp_path / "data" / "cifar10_32px.pt").is_file()


def test_imagenet_weights_without_network_say_how_to_run_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DemoError, match="needs network access once") as raised:
        main(["--quick", "--weights", "imagenet", "--out", str(tmp_path)])
    assert "--weights none" in str(raised.value)


@pytest.mark.slow
def test_full_run_finishes_and_every_run_learns(tmp_path: Path) -> None:
    results = main(["--out", str(tmp_path)])
    assert results["settings"]["repeats"] == 3
    for run in results["runs"].values():
        assert len(run["accuracies"]) == 3
        assert run["accuracy"] > 0.5
