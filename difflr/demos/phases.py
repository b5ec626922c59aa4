"""The phases of the main job, each on its own pool of the digits (`difflr.demos.protocol`): the
draws (`make_tasks`), the selection of every hyper-parameter on the selection pool (`select`,
`choose`; `default_choice` without ``--select``), the evaluation of every method on the
evaluation pool (`evaluate_methods`, `summarise`), and the LR sweep (`lr_sweep`). The job that
runs them in order is `difflr.demos.ablation`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from difflr.demos.baselines import BASELINE_NAMES, baseline_accuracies
from difflr.demos.digits import to_input
from difflr.demos.protocol import SHIFTS, draw_from_pool, paired_interval, shifted_inputs
from difflr.demos.recipes import QUICK_LR, RECIPE_NAMES, Job, Task, run_jobs
from difflr.demos.settings import (
    BUDGET_TOLERANCE,
    BUDGETS,
    CHOSEN,
    LR_GRIDS,
    NOT_FINE_TUNING,
    RUN_NAMES,
    SWEEP_RECIPES,
    DemoError,
    Settings,
)

__all__ = [
    "choose",
    "default_choice",
    "evaluate_methods",
    "lr_sweep",
    "make_tasks",
    "score_baseline",
    "select",
    "summarise",
]

# --------------------------------------------------------------------------------------------
# Draws
# --------------------------------------------------------------------------------------------


def make_tasks(
    levels: torch.Tensor,
    labels: torch.Tensor,
    pool: torch.Tensor,
    count: int,
    settings: Settings,
    stream: int,
    shifts: bool,
) -> list[Task]:
    """``count`` draws from ``pool`` (``stream`` keeps the selection's and the evaluation's draws
    and seeds apart)."""
    generator = torch.Generator().manual_seed(settings.seed * 1000 + settings.shots + stream)
    tasks = []
    for index in range(count):
        try:
            draw = draw_from_pool(labels, pool, settings.shots, generator)
        except ValueError as error:
            raise DemoError(f"--shots {settings.shots} is too many: {error}") from error
        test = draw.test if settings.test_limit is None else draw.test[: settings.test_limit]
        test_sets = {"clean": (to_input(levels[test]), labels[test])}
        if shifts:
            for kind in SHIFTS:
                test_sets[kind] = (shifted_inputs(levels[test], kind, seed=index), labels[test])
        seed = settings.seed + index + stream
        tasks.append(Task(draw, levels[draw.train], labels[draw.train], test_sets, seed))
    return tasks


def score_baseline(name: str, task: Task, backbone: nn.Module, c: float | None) -> dict[str, Any]:
    """Fit baseline ``name`` on the task's labelled images; its scores on every test set."""
    start = time.perf_counter()
    scores = baseline_accuracies(
        name, to_input(task.train_levels), task.train_labels, task.test_sets, c, backbone
    )
    return {"scores": scores, "seconds": time.perf_counter() - start, "c": c}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------------------------
# Selection (on the selection pool only)
# --------------------------------------------------------------------------------------------


def _best(grid: dict[str, list[float]]) -> float:
    """The grid value (a string key) of the best mean accuracy; the smaller on a tie."""
    return float(max(sorted(grid, key=float), key=lambda key: _mean(grid[key])))


def choose(selection: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The hyper-parameters a selection record picks: each recipe's LR and each regression's C
    with the best mean accuracy (the smaller on a tie), and ``scratch_long``'s budget: the
    smallest that no larger one beats by more than `BUDGET_TOLERANCE`."""
    chosen: dict[str, dict[str, float]] = {"knn_pixels": {}}
    for name, grid in selection["c"].items():
        chosen[name] = {"c": _best(grid)}
    for name, grid in selection["lr"].items():
        chosen[name] = {"lr": _best(grid)}
    budgets = {int(k): _mean(v) for k, v in selection["budget"].items()}
    top = max(budgets.values())
    budget = min(b for b, m in budgets.items() if m >= top - BUDGET_TOLERANCE)
    chosen["scratch_long"] = {"lr": chosen["scratch"]["lr"], "budget": budget}
    return {name: chosen[name] for name in RUN_NAMES}


def select(
    tasks: list[Task], backbone: nn.Module, settings: Settings, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Try every grid value on the selection draws; returns the record `choose` reads."""
    record: dict[str, Any] = {"draws": len(tasks), "c": {}, "lr": {}, "budget": {}}
    for name in ("logreg_pixels", "linear_probe"):
        record["c"][name] = {
            str(c): [score_baseline(name, t, backbone, c)["scores"]["clean"] for t in tasks]
            for c in settings.c_grid
        }
    jobs = [
        Job(name, lr, index)
        for name in LR_GRIDS
        for lr in settings.grid(name)
        for index in range(len(tasks))
    ]
    infos = iter(run_jobs(jobs, tasks, backbone, settings.spec, settings.workers))
    for name in LR_GRIDS:
        record["lr"][name] = {}
        for lr in settings.grid(name):
            scores = [next(infos)["scores"]["clean"] for _ in tasks]
            record["lr"][name][str(lr)] = scores
            progress(f"selection: {name} lr {lr:g}: {_mean(scores):.3f}")
    scratch_lr = _best(record["lr"]["scratch"])
    record["budget"]["1"] = record["lr"]["scratch"][str(scratch_lr)]
    jobs = [
        Job("scratch_long", scratch_lr, index, budget)
        for budget in settings.budgets[1:]
        for index in range(len(tasks))
    ]
    infos = iter(run_jobs(jobs, tasks, backbone, settings.spec, settings.workers))
    for budget in settings.budgets[1:]:
        scores = [next(infos)["scores"]["clean"] for _ in tasks]
        record["budget"][str(budget)] = scores
        progress(f"selection: scratch, budget x{budget}: {_mean(scores):.3f}")
    record["chosen"] = choose(record)
    return record


def default_choice(settings: Settings) -> dict[str, dict[str, float]]:
    """`CHOSEN`, or `QUICK_LR` for every recipe in ``--quick`` (a tiny backbone)."""
    quick = {name: {**values} for name, values in CHOSEN.items()}
    if settings.quick:
        for values in quick.values():
            if "lr" in values:
                values["lr"] = QUICK_LR
            if "budget" in values:
                values["budget"] = BUDGETS[1]
    return quick


# --------------------------------------------------------------------------------------------
# Evaluation (on the evaluation pool only)
# --------------------------------------------------------------------------------------------


def evaluate_methods(
    tasks: list[Task],
    backbone: nn.Module,
    chosen: dict[str, dict[str, float]],
    settings: Settings,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every method of the table on every evaluation draw; also the figures written (by the
    first draw's runs)."""
    runs: dict[str, dict[str, Any]] = {
        name: {"scores": {key: [] for key in tasks[0].test_sets}, "seconds": 0.0}
        for name in RUN_NAMES
    }
    jobs = [
        Job(name, chosen[name]["lr"], index, int(chosen[name].get("budget", 1)), index == 0)
        for index in range(len(tasks))
        for name in RECIPE_NAMES
    ]
    infos = iter(run_jobs(jobs, tasks, backbone, settings.spec, settings.workers))
    figures: list[str] = []
    for task in tasks:
        for name in RUN_NAMES:
            if name in BASELINE_NAMES:
                info = score_baseline(name, task, backbone, chosen[name].get("c"))
            else:
                info = next(infos)
                figures += info.pop("figures")
            for key, value in info.pop("scores").items():
                runs[name]["scores"][key].append(value)
            runs[name]["seconds"] += info.pop("seconds") / len(tasks)
            if name == "discriminative":
                runs[name].setdefault("head_lr_per_draw", []).append(info.pop("head_lr"))
            runs[name].update(info)
    return runs, figures


def summarise(runs: dict[str, dict[str, Any]]) -> str:
    """Add means, stds and the paired intervals to ``runs``; returns the best baseline's name
    (the best mean accuracy of the methods that fine-tune nothing)."""
    for run_ in runs.values():
        run_["accuracies"] = run_["scores"].pop("clean")
        run_["shifted"] = run_.pop("scores")
        run_["accuracy"] = _mean(run_["accuracies"])
        run_["accuracy_std"] = _std(run_["accuracies"])
        run_["shifted_accuracy"] = {k: _mean(v) for k, v in run_["shifted"].items()}
    best = max(NOT_FINE_TUNING, key=lambda name: runs[name]["accuracy"])
    for run_ in runs.values():
        run_["vs_best_baseline"] = _interval(run_["accuracies"], runs[best]["accuracies"])
        run_["vs_full"] = _interval(run_["accuracies"], runs["full"]["accuracies"])
        run_["shifted_vs_full"] = {
            key: _interval(values, runs["full"]["shifted"][key])
            for key, values in run_["shifted"].items()
        }
    return best


def _interval(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """`paired_interval` with JSON-safe bounds (``None`` below 2 draws)."""
    interval = paired_interval(a, b)
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in interval.items()}


def lr_sweep(
    tasks: list[Task],
    backbone: nn.Module,
    runs: dict[str, dict[str, Any]],
    settings: Settings,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """`SWEEP_RECIPES` at every LR of the sweep on the evaluation draws (a run at the LR the
    table used is the table's run, not repeated: same draw, same seed)."""
    lrs = settings.sweep_lrs
    jobs = [
        Job(name, lr, index)
        for name in SWEEP_RECIPES
        for lr in lrs
        if lr != runs[name]["lr"]
        for index in range(len(tasks))
    ]
    infos = iter(run_jobs(jobs, tasks, backbone, settings.spec, settings.workers))
    sweep: dict[str, Any] = {"lrs": list(lrs), "recipes": {}}
    for name in SWEEP_RECIPES:
        sweep["recipes"][name] = {}
        for lr in lrs:
            if lr == runs[name]["lr"]:
                scores = {"clean": runs[name]["accuracies"], **runs[name]["shifted"]}
            else:
                scores = {key: [] for key in tasks[0].test_sets}
                for _ in tasks:
                    for key, value in next(infos)["scores"].items():
                        scores[key].append(value)
            sweep["recipes"][name][str(lr)] = {
                "accuracies": scores["clean"],
                "accuracy": _mean(scores["clean"]),
                "accuracy_std": _std(scores["clean"]),
                "shifted_accuracy": {k: _mean(v) for k, v in scores.items() if k != "clean"},
            }
            progress(f"lr sweep: {name} lr {lr:g}: {_mean(scores['clean']):.3f}")
    full = sweep["recipes"]["full"]
    sweep["vs_full"] = {
        name: {lr: _interval(points[lr]["accuracies"], full[lr]["accuracies"]) for lr in points}
        for name, points in sweep["recipes"].items()
        if name != "full"
    }
    return sweep
