"""Tests for the main job (difflr.demos.ablation, settings, phases, protocol, baselines, recipes,
report): a quick run end to end with the selection and the LR sweep, the protocol's disjointness
(in the quick run and in the committed results), the statistics in closed form, the tables,
figures and flags."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from difflr import Stage
from difflr.demos.ablation import main
from difflr.demos.baselines import baseline_accuracies
from difflr.demos.digits import to_input, uci_digits
from difflr.demos.phases import choose, make_tasks
from difflr.demos.protocol import (
    SHIFTS,
    draw_from_pool,
    paired_interval,
    shifted_inputs,
    split_pools,
)
from difflr.demos.recipes import MILESTONES, RECIPE_NAMES
from difflr.demos.report import format_table, plot_accuracy, plot_lr_sweep, sweep_of
from difflr.demos.settings import CHOSEN, LR_SWEEP, RUN_NAMES, DemoError, parse_args

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "results" / "demo.json"
FIGURES = [
    "accuracy",
    "lr_sweep",
    "discriminative_lr_find",
    "discriminative_head_sched",
    "discriminative_unfrozen_sched",
    "stage_plan_sched",
]
GROUPS = ["0.stem", "1.layer1", "2.layer2", "3.layer3", "4.layer4", "5.head"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("demo")
    argv = ["--quick", "--select", "--lr-sweep", "--out", str(out), "--cache-dir", str(out / "c")]
    return main(argv), out


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(COMMITTED.read_text())


def _assert_protocol_holds(results: dict, labels: torch.Tensor) -> None:
    """The pools split every image in two; every selection draw lies in the selection pool and
    every evaluation draw in the evaluation pool, so no evaluation image took part in a choice."""
    protocol = results["protocol"]
    selection, evaluation = set(protocol["selection"]), set(protocol["evaluation"])
    assert not selection & evaluation
    assert selection | evaluation == set(range(len(labels)))
    pools = split_pools(labels)  # the split is fixed: today's code gives the recorded indices
    assert protocol["selection"] == pools.selection.tolist()
    assert protocol["evaluation"] == pools.evaluation.tolist()
    shots = results["settings"]["shots"]
    for key, pool in (("selection_draws", selection), ("evaluation_draws", evaluation)):
        for train in protocol.get(key, []):
            assert set(train) <= pool, key
            assert np.bincount(labels[train].numpy()).tolist() == [shots] * 10, key
    if "runs" in results:
        assert len(protocol["evaluation_draws"]) == results["settings"]["draws"]


# --------------------------------------------------------------------------------------------
# A quick run end to end
# --------------------------------------------------------------------------------------------


def test_quick_run_writes_results_json_with_every_method(quick_run: tuple[dict, Path]) -> None:
    results, out = quick_run
    written = json.loads((out / "results.json").read_text())
    assert list(written["runs"]) == list(RUN_NAMES)
    for name, run in written["runs"].items():
        assert len(run["accuracies"]) == 1, name
        assert all(0 <= a <= 1 for a in run["accuracies"]), name
        assert run["accuracy"] == pytest.approx(np.mean(run["accuracies"]))
        assert run["accuracy"] == pytest.approx(results["runs"][name]["accuracy"])
        assert set(run["shifted"]) == set(SHIFTS), name
        assert run["vs_full"]["mean"] == pytest.approx(
            run["accuracy"] - written["runs"]["full"]["accuracy"]
        )
        assert run["vs_best_baseline"]["low"] is None  # one draw: no interval
    for name in RECIPE_NAMES:
        run = written["runs"][name]
        assert run["seconds"] > 0 and run["call"], name
    assert written["runs"]["scratch_long"]["steps"] > written["runs"]["scratch"]["steps"]
    assert written["best_baseline"] in (
        "knn_pixels",
        "logreg_pixels",
        "linear_probe",
        "scratch",
        "scratch_long",
    )
    assert written["pretraining"]["loaded_from_cache"] is False
    assert Path(written["pretraining"]["path"]).parent == out / "c"
    assert written["machine"]["cores"] >= 1 and len(written["machine"]["load_at_start"]) == 3


def test_quick_run_selects_on_the_selection_pool_only(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    _, labels = uci_digits()
    _assert_protocol_holds(results, labels)
    selection = results["selection"]
    assert selection["chosen"] == choose(selection)
    chosen = {k: v for k, v in results["hyper_parameters"].items() if k != "chosen_by"}
    assert chosen == selection["chosen"]
    for name in RECIPE_NAMES:
        assert results["runs"][name]["lr"] == chosen[name]["lr"], name


def test_quick_run_sweeps_the_lr_on_the_same_draws(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    sweep = results["lr_sweep"]
    assert set(sweep["recipes"]) == {"full", "fine_tune", "discriminative"}
    full = results["runs"]["full"]
    # The table's run is the sweep's point at the same LR (same draw, same seed).
    assert sweep["recipes"]["full"][str(full["lr"])]["accuracies"] == full["accuracies"]
    for name, points in sweep["recipes"].items():
        assert [float(lr) for lr in points] == sweep["lrs"], name
    assert set(sweep["vs_full"]) == {"fine_tune", "discriminative"}


def test_quick_run_writes_every_figure_as_a_png(quick_run: tuple[dict, Path]) -> None:
    results, out = quick_run
    for name in FIGURES:
        path = out / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(results["figures"]) == sorted(str(out / "figures" / f"{n}.png") for n in FIGURES)


def test_quick_run_logs_every_group_of_the_first_draw(quick_run: tuple[dict, Path]) -> None:
    _, out = quick_run
    for run in ("discriminative", "stage_plan"):
        tags: set[str] = set()
        for events in (out / "tensorboard" / run).rglob("events.out.tfevents.*"):
            accumulator = EventAccumulator(str(events))
            accumulator.Reload()
            tags.update(accumulator.Tags()["scalars"])
        assert {f"lr/{g}" for g in GROUPS} <= tags, run


def test_quick_run_learns_better_than_chance(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    assert results["settings"]["chance"] == pytest.approx(0.1)
    assert max(run["accuracy"] for run in results["runs"].values()) > 0.2


def test_table_lists_every_method_with_its_accuracy_and_differences(
    quick_run: tuple[dict, Path],
) -> None:
    results, _ = quick_run
    table = format_table(results)
    for name, run in results["runs"].items():
        line = next(line for line in table.splitlines() if line.startswith(f"{name} "))
        assert f"{run['accuracy']:.3f} ± {run['accuracy_std']:.3f}" in line
        if name != "full":
            assert f"{run['vs_full']['mean']:+.3f}" in line


def test_accuracy_figure_draws_each_method_at_its_means(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    figure = plot_accuracy(results)
    clean, rotated, noisy = figure.axes[0].containers
    names = list(results["runs"])
    np.testing.assert_allclose(
        np.asarray(clean.lines[0].get_xdata(), float),
        [results["runs"][n]["accuracy"] for n in names],
    )
    np.testing.assert_allclose(
        np.asarray(noisy.lines[0].get_xdata(), float),
        [results["runs"][n]["shifted_accuracy"]["noisy"] for n in names],
    )
    assert [c.get_label() for c in (clean, rotated, noisy)] == ["clean", "rotated", "noisy"]


def test_lr_sweep_figure_draws_each_recipe_at_its_means(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    figure = plot_lr_sweep(results)
    sweep = results["lr_sweep"]["recipes"]
    assert len(figure.axes[0].containers) == len(sweep)
    for container, points in zip(figure.axes[0].containers, sweep.values()):
        line = container.lines[0]
        np.testing.assert_allclose(
            np.asarray(line.get_xdata(), float), [float(lr) for lr in points]
        )
        np.testing.assert_allclose(
            np.asarray(line.get_ydata(), float), [p["accuracy"] for p in points.values()]
        )


# --------------------------------------------------------------------------------------------
# The protocol and the statistics
# --------------------------------------------------------------------------------------------


def test_the_pools_split_every_class_a_third_to_selection() -> None:
    _, labels = uci_digits()
    pools = split_pools(labels)
    assert len(pools.selection) + len(pools.evaluation) == 1797
    assert not set(pools.selection.tolist()) & set(pools.evaluation.tolist())
    per_class = np.bincount(labels[pools.selection].numpy())
    np.testing.assert_array_equal(per_class, np.round(np.bincount(labels.numpy()) / 3))
    assert torch.equal(split_pools(labels).selection, pools.selection)  # fixed


def test_a_draw_trains_and_tests_inside_its_pool() -> None:
    _, labels = uci_digits()
    pools = split_pools(labels)
    draw = draw_from_pool(labels, pools.evaluation, 3, torch.Generator().manual_seed(0))
    assert np.bincount(labels[draw.train].numpy()).tolist() == [3] * 10
    assert sorted(draw.train.tolist() + draw.test.tolist()) == pools.evaluation.tolist()
    with pytest.raises(ValueError, match=r"class \d has \d+ images, not more than shots=200"):
        draw_from_pool(labels, pools.selection, 200, torch.Generator().manual_seed(0))


def test_too_many_shots_is_a_demo_error() -> None:
    levels, labels = uci_digits()
    settings = parse_args(["--shots", "100", "--quick"])
    with pytest.raises(DemoError, match=r"--shots 100 is too many: class \d has \d+ images"):
        make_tasks(levels, labels, split_pools(labels).selection, 1, settings, 0, False)


def test_paired_interval_is_the_t_interval_of_the_differences() -> None:
    a = [0.9, 0.8, 0.95, 0.85, 0.9, 0.7, 0.9, 0.88, 0.92, 0.81]
    b = [0.8, 0.8, 0.90, 0.80, 0.8, 0.7, 0.85, 0.8, 0.90, 0.80]
    diff = np.subtract(a, b)
    half = 2.262157 * diff.std(ddof=1) / math.sqrt(10)  # t(0.975, 9 degrees of freedom)
    interval = paired_interval(a, b)
    assert interval["n"] == 10
    assert interval["mean"] == pytest.approx(diff.mean())
    assert interval["low"] == pytest.approx(diff.mean() - half, rel=1e-5)
    assert interval["high"] == pytest.approx(diff.mean() + half, rel=1e-5)
    assert math.isnan(paired_interval([1.0], [0.5])["low"])
    with pytest.raises(ValueError, match="one value per draw"):
        paired_interval([1.0, 2.0], [1.0])


def test_shifted_test_sets_are_fixed_by_the_seed_and_differ_from_the_clean() -> None:
    levels, _ = uci_digits()
    levels = levels[:50]
    clean = to_input(levels)
    for kind in SHIFTS:
        shifted = shifted_inputs(levels, kind, seed=3)
        assert shifted.shape == clean.shape
        assert torch.equal(shifted, shifted_inputs(levels, kind, seed=3)), kind
        assert not torch.equal(shifted, shifted_inputs(levels, kind, seed=4)), kind
        assert float((shifted - clean).abs().mean()) > 0.1, kind
    # Noise stays within the grey levels: the input never leaves to_input's range for 0..16.
    assert (
        float(shifted_inputs(levels, "noisy").max())
        <= float(to_input(torch.full((1, 8, 8), 16)).max()) + 1e-6
    )
    with pytest.raises(ValueError, match="unknown shift 'blur'"):
        shifted_inputs(levels, "blur")


def test_baselines_recall_their_own_training_images() -> None:
    levels, labels = uci_digits()
    inputs = to_input(levels[:60])
    own = {"train": (inputs, labels[:60])}
    assert baseline_accuracies("knn_pixels", inputs, labels[:60], own) == {"train": 1.0}
    assert baseline_accuracies("logreg_pixels", inputs, labels[:60], own, c=100.0) == {"train": 1.0}
    with pytest.raises(ValueError, match="needs its C"):
        baseline_accuracies("logreg_pixels", inputs, labels[:60], own)
    with pytest.raises(ValueError, match="unknown baseline 'svm'"):
        baseline_accuracies("svm", inputs, labels[:60], own)


def test_choose_takes_the_best_mean_and_the_smallest_budget_that_suffices() -> None:
    grid = {"0.001": [0.5, 0.6], "0.003": [0.8, 0.8], "0.01": [0.8, 0.8]}  # a tie: the smaller
    selection = {
        "c": {"logreg_pixels": {"0.1": [0.7], "1.0": [0.9]}, "linear_probe": {"1.0": [0.5]}},
        "lr": {
            name: grid
            for name in ("scratch", "frozen", "full", "fine_tune", "discriminative", "stage_plan")
        },
        "budget": {"1": [0.80], "3": [0.896], "10": [0.905]},  # x10 adds under 0.01
    }
    chosen = choose(selection)
    assert chosen["full"] == {"lr": 0.003}
    assert chosen["logreg_pixels"] == {"c": 1.0}
    assert chosen["scratch_long"] == {"lr": 0.003, "budget": 3}
    selection["budget"]["10"] = [0.95]
    assert choose(selection)["scratch_long"]["budget"] == 10
    assert list(chosen) == list(RUN_NAMES)


# --------------------------------------------------------------------------------------------
# The committed results
# --------------------------------------------------------------------------------------------


def test_the_committed_results_never_chose_on_an_evaluation_image(committed: dict) -> None:
    _, labels = uci_digits()
    _assert_protocol_holds(committed, labels)
    assert "selection" in committed and committed["settings"]["draws"] >= 10
    assert committed["settings"]["quick"] is False


def test_the_default_hyper_parameters_are_the_committed_selection(committed: dict) -> None:
    assert choose(committed["selection"]) == committed["selection"]["chosen"] == CHOSEN
    used = {k: v for k, v in committed["hyper_parameters"].items() if k != "chosen_by"}
    assert used == CHOSEN
    for name in RECIPE_NAMES if "runs" in committed else ():
        assert committed["runs"][name]["lr"] == CHOSEN[name]["lr"], name


def test_the_committed_results_hold_intervals_sweep_and_shifts(committed: dict) -> None:
    sweep, _ = sweep_of(committed)
    assert [float(lr) for lr in sweep["recipes"]["full"]] == list(LR_SWEEP)
    if "runs" not in committed:
        pytest.skip("the committed results hold the selection only; the evaluation is to come")
    runs = committed["runs"]
    best = committed["best_baseline"]
    for name, run in runs.items():
        diff = np.subtract(run["accuracies"], runs[best]["accuracies"])
        assert run["vs_best_baseline"]["mean"] == pytest.approx(diff.mean()), name
        assert run["vs_best_baseline"]["low"] <= diff.mean() <= run["vs_best_baseline"]["high"]
        assert set(run["shifted"]) == set(SHIFTS), name
    assert best == max(
        ("knn_pixels", "logreg_pixels", "linear_probe", "scratch", "scratch_long"),
        key=lambda n: runs[n]["accuracy"],
    )


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def test_flags_have_the_documented_defaults_and_are_validated() -> None:
    full = parse_args([])
    assert (full.shots, full.draws, full.epochs, full.source) == (5, 10, 6, "glyphs")
    assert (full.select, full.lr_sweep, full.selection_draws) == (False, False, 3)
    assert full.workers == min(2, os.cpu_count() or 1)  # one per core of a 2-core machine
    assert full.out == Path("difflr_demo") and full.cache_dir is None and not full.rebuild
    assert full.pretrain_config.glyphs.per_class == 300
    letters = parse_args(["--source", "letters"]).pretrain_config
    assert letters.glyphs.chars.isalpha() and letters.epochs == full.pretrain_config.epochs
    quick = parse_args(["--quick"])
    assert quick.draws == 1 and quick.pretrain_config.epochs == 1
    assert (full.threads, parse_args(["--threads", "0"]).threads) == (1, None)
    for bad in (
        ["--shots", "0"],
        ["--draws", "0"],
        ["--workers", "0"],
        ["--threads", "-1"],
        ["--source", "x"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_milestones_are_the_original_plan() -> None:
    stages = Stage.from_milestones(MILESTONES)
    assert [s.freeze_to for s in stages] == [-1, -2, -3, -4, -5, 0]
    assert [s.epochs for s in stages] == [1] * 6
    assert stages[0].lrs(6) == [0.0] * 5 + [1e-3]
    assert stages[-1].lrs(6) == [1e-6] * 6
    assert all(s.pct_start == 0.3 for s in stages)


@pytest.mark.slow
def test_worker_processes_give_the_same_numbers(tmp_path: Path) -> None:
    argv = ["--quick", "--cache-dir", str(tmp_path / "c")]
    one = main([*argv, "--out", str(tmp_path / "one")])
    two = main([*argv, "--out", str(tmp_path / "two"), "--workers", "2"])
    for name in RUN_NAMES:
        assert one["runs"][name]["accuracies"] == two["runs"][name]["accuracies"], name
        assert one["runs"][name]["shifted"] == two["runs"][name]["shifted"], name
