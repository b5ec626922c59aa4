"""The main job: what each fine-tuning recipe is worth, measured as a reviewer would ask, offline,
on 2 CPU cores.

``python -m difflr.demo`` takes a backbone pretrained on rendered font glyphs
(`difflr.demos.backbone`: built once, a few minutes, then cached) and fine-tunes it on the real
handwritten UCI digits (all 10 classes, scikit-learn's copy) from ``--shots`` labelled images per
class. The protocol (`difflr.demos.protocol`): the 1,797 digits are split once into a selection
pool (a third) and an evaluation pool; every hyper-parameter was chosen on draws from the
selection pool (``--select`` chooses them again); every reported number comes from ``--draws``
draws from the evaluation pool (the labelled images of a draw, and the pool's other images as
its test set), the same draws for every method. Inputs are normalised with the pretraining
source's statistics.

The methods, each one difflr call (or a scikit-learn baseline), the recipes all with the same
budget (``--epochs`` epochs of ``BATCHES_PER_EPOCH`` batches of ``BATCH_SIZE`` augmented images)
except ``scratch_long``:

- baselines that fine-tune nothing (`difflr.demos.baselines`): 1-NN and logistic regression on
  the pixels, logistic regression on the frozen backbone's features (a linear probe);
- ``scratch`` / ``scratch_long``: a randomly initialised slim ResNet, ``fit_one_cycle`` at the
  same budget / at the budget where it stops improving (chosen on the selection pool);
- ``frozen``: ``freeze(); fit_one_cycle``: the new head (BatchNorm, Linear 128→512, ReLU,
  BatchNorm, Linear 512→10) and the body's BatchNorm layers train, the convolutions do not;
- ``full``: ``fit_one_cycle`` of everything at one LR;
- ``fine_tune``: fastai's ``fine_tune(epochs - 1, base_lr)`` (one frozen epoch, then all);
- ``discriminative``: ``freeze(); lr_find(); fit_one_cycle(1, valley); unfreeze();
  fit_one_cycle(epochs - 1, slice(lr / 10, lr))``;
- ``stage_plan``: the original example's six stages (``fit_stages``), one layer group unfrozen
  per epoch, its LRs scaled by ``lr / 1e-3`` (1e-3 is the original plan's head LR).

Every model is also tested on shifted copies of its test set (`protocol.SHIFTS`: rotated and
sheared; noisy). For each method ``results.json`` holds the accuracy of every draw, its mean, and
the mean paired difference to the best baseline and to ``full`` with a 95% t-interval.
``--lr-sweep`` adds the accuracy of ``full``, ``fine_tune`` and ``discriminative`` at each LR of
`LR_SWEEP` on the same draws. The numbers are in ``docs/results/demo.json`` and the tables of the
README and ``docs/demo.md`` are generated from it by ``docs/gen_tables.py``.

Examples:
    From Python, with tiny settings (the command line takes the same flags)::

        from difflr.demos.ablation import main
        results = main(["--quick", "--out", "/tmp/difflr_demo"])
        results["runs"]["full"]["accuracies"]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from difflr.demos.backbone import TUTORIAL_PRETRAIN, PretrainConfig, pretrained_backbone
from difflr.demos.baselines import BASELINE_NAMES, C_GRID, baseline_accuracies
from difflr.demos.digits import PIXEL_MEAN, PIXEL_STD, to_input, uci_digits
from difflr.demos.glyphs import GlyphConfig, glyph_classes
from difflr.demos.protocol import (
    SHIFTS,
    draw_from_pool,
    paired_interval,
    shifted_inputs,
    split_pools,
)
from difflr.demos.recipes import (
    N_CLASSES,
    QUICK_LR,
    RECIPE_NAMES,
    Figures,
    Job,
    RunSpec,
    Task,
    run_jobs,
)
from difflr.demos.report import format_table, plot_accuracy, plot_lr_sweep

__all__ = [
    "BATCHES_PER_EPOCH",
    "BATCH_SIZE",
    "BUDGETS",
    "BUDGET_TOLERANCE",
    "CHOSEN",
    "LR_GRIDS",
    "LR_SWEEP",
    "NOT_FINE_TUNING",
    "QUICK_PRETRAIN",
    "RUN_NAMES",
    "SOURCES",
    "SWEEP_RECIPES",
    "DemoError",
    "Settings",
    "choose",
    "cli",
    "default_choice",
    "evaluate_methods",
    "lr_sweep",
    "machine",
    "main",
    "make_tasks",
    "parse_args",
    "score_baseline",
    "select",
    "summarise",
    "write_results",
]

#: Every method of the table, baselines first; ``results.json`` uses these names.
RUN_NAMES = BASELINE_NAMES + RECIPE_NAMES
#: The methods that fine-tune no pretrained weight: the headline gain is measured against the best.
NOT_FINE_TUNING = (*BASELINE_NAMES, "scratch", "scratch_long")
BATCH_SIZE = 32
BATCHES_PER_EPOCH = 10  # the few labelled images, augmented, reshuffled and repeated
#: The LR sweep (``--lr-sweep``): two decades.
LR_SWEEP = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
#: The recipes the LR sweep runs.
SWEEP_RECIPES = ("full", "fine_tune", "discriminative")
#: Each recipe's LRs tried on the selection pool (``stage_plan``: its first stage's head LR).
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "scratch": (3e-3, 1e-2, 3e-2),
    "frozen": (1e-3, 3e-3, 1e-2),
    "full": LR_SWEEP,
    "fine_tune": LR_SWEEP,
    "discriminative": LR_SWEEP,
    "stage_plan": (1e-3, 3e-3, 1e-2, 3e-2),
}
#: Budgets of ``scratch_long`` tried on the selection pool, in multiples of the others' budget.
BUDGETS = (1, 3, 10)
#: ``scratch_long`` gets the smallest budget that no larger one beats by more than this (one point
#: of accuracy: where tripling the budget again stops paying).
BUDGET_TOLERANCE = 0.01
#: The hyper-parameters ``--select`` chose on the selection pool (``docs/results/demo.json``'s
#: ``selection.chosen``; ``tests/test_demo.py`` checks that they are its choice).
CHOSEN: dict[str, dict[str, float]] = {
    "knn_pixels": {},
    "logreg_pixels": {"c": 0.1},
    "linear_probe": {"c": 0.1},
    "scratch": {"lr": 0.01},
    "scratch_long": {"lr": 0.01, "budget": 3},
    "frozen": {"lr": 0.001},
    "full": {"lr": 0.001},
    "fine_tune": {"lr": 0.003},
    "discriminative": {"lr": 0.001},
    "stage_plan": {"lr": 0.003},
}
#: ``--source``: the pretraining. The tutorials' (`TUTORIAL_PRETRAIN`: 300 images of each of 52
#: glyph classes, 3 epochs, about a minute on 2 quiet cores; one cache file serves both) rather
#: than the 6-epoch, 1,000-per-class `PretrainConfig()`, which costs 5x more for +0.015 of full
#: fine-tuning's accuracy: the whole job then fits its 10 minutes.
SOURCES = {
    # Letters and printed digits: the target's classes are among the source's (printed, not
    # handwritten), which is what a real pretraining corpus would hold too.
    "glyphs": TUTORIAL_PRETRAIN,
    # Letters only: no target class is ever seen before fine-tuning.
    "letters": dataclasses.replace(
        TUTORIAL_PRETRAIN,
        glyphs=dataclasses.replace(TUTORIAL_PRETRAIN.glyphs, chars=GlyphConfig().chars[10:]),
    ),
}
#: ``--quick``: a pretraining of seconds, for smoke tests.
QUICK_PRETRAIN = PretrainConfig(
    glyphs=GlyphConfig(per_class=40, fonts=GlyphConfig().fonts[::4]),
    widths=(8, 8, 16, 16),
    epochs=1,
    n_valid=200,
)


class DemoError(RuntimeError):
    """A problem the user can fix on the command line (more ``--shots`` than a digit has)."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on; ``results.json`` records it."""

    out: Path
    seed: int
    shots: int  # labelled images per class
    draws: int  # draws from the evaluation pool, the same for every method
    selection_draws: int  # draws from the selection pool (--select)
    epochs: int  # target epochs of every recipe
    epoch_batches: int
    batch_size: int
    source: str
    cache_dir: Path | None
    rebuild: bool
    quick: bool
    select: bool
    lr_sweep: bool
    threads: int | None
    workers: int  # worker processes for the runs (1: this process)
    lr_find_iters: int
    test_limit: int | None  # at most this many test images per draw (None: the pool's others)

    @property
    def spec(self) -> RunSpec:
        return RunSpec(
            self.out,
            self.epochs,
            self.epoch_batches,
            self.batch_size,
            self.quick,
            self.lr_find_iters,
        )

    @property
    def pretrain_config(self) -> PretrainConfig:
        if self.quick:
            return QUICK_PRETRAIN
        return SOURCES[self.source]

    def grid(self, name: str) -> tuple[float, ...]:
        return LR_GRIDS[name][1:3] if self.quick else LR_GRIDS[name]

    @property
    def sweep_lrs(self) -> tuple[float, ...]:
        return LR_SWEEP[1:3] if self.quick else LR_SWEEP

    @property
    def budgets(self) -> tuple[int, ...]:
        return BUDGETS[:2] if self.quick else BUDGETS

    @property
    def c_grid(self) -> tuple[float, ...]:
        return C_GRID[1:3] if self.quick else C_GRID


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Read the command line (``python -m difflr.demo --help`` lists the flags)."""
    parser = argparse.ArgumentParser(
        prog="python -m difflr.demo",
        description="What each fine-tuning recipe is worth: a slim ResNet pretrained on rendered "
        "glyphs, fine-tuned on the UCI handwritten digits from a few labels per class, against "
        "baselines, with paired confidence intervals.",
    )
    parser.add_argument("--out", type=Path, default=Path("difflr_demo"), help="output folder")
    parser.add_argument("--shots", type=int, default=5, help="labelled images per class")
    parser.add_argument("--draws", type=int, default=10, help="draws from the evaluation pool")
    parser.add_argument(
        "--select",
        action="store_true",
        help="choose every hyper-parameter again on the selection pool, then evaluate with them",
    )
    parser.add_argument(
        "--selection-draws", type=int, default=3, help="draws from the selection pool (--select)"
    )
    parser.add_argument(
        "--lr-sweep",
        action="store_true",
        help=f"also run {', '.join(SWEEP_RECIPES)} at every LR of {LR_SWEEP}",
    )
    parser.add_argument("--epochs", type=int, default=6, help="target epochs of every recipe")
    parser.add_argument(
        "--source",
        choices=sorted(SOURCES),
        default="glyphs",
        help="pretraining glyphs: letters and printed digits (default), or letters only",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder of the pretrained backbone (default: $DIFFLR_CACHE_DIR, "
        "$XDG_CACHE_HOME/difflr or ~/.cache/difflr)",
    )
    parser.add_argument("--rebuild", action="store_true", help="pretrain again, overwrite cache")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1; 0: torch's default). The network is small, so a "
        "second thread gains little (about 8%% at batch 128 on an idle 2-core machine), and "
        "when another process holds a core every operation waits for the descheduled "
        "thread: 5-10x slower on the machine this was measured on",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes for the runs, one torch thread each (default 1: this process); "
        "the results do not depend on it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="tiny pretraining, one draw: a smoke test in seconds"
    )
    args = parser.parse_args(argv)
    for name in ("shots", "draws", "selection_draws", "epochs", "workers"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    quick = args.quick
    return Settings(
        out=args.out,
        seed=args.seed,
        shots=args.shots,
        draws=1 if quick else args.draws,
        selection_draws=1 if quick else args.selection_draws,
        epochs=args.epochs,
        epoch_batches=3 if quick else BATCHES_PER_EPOCH,
        batch_size=BATCH_SIZE,
        source=args.source,
        cache_dir=args.cache_dir,
        rebuild=args.rebuild,
        quick=quick,
        select=args.select,
        lr_sweep=args.lr_sweep,
        threads=args.threads or None,
        workers=args.workers,
        lr_find_iters=20 if quick else 100,
        test_limit=200 if quick else None,
    )


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


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine() -> dict[str, Any]:
    """Where the numbers were measured, and how busy the machine was."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        cpu = found.group(1).strip() if found else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "load_at_start": list(os.getloadavg()),
    }


def write_results(results: dict[str, Any], out: Path) -> None:
    """``results.json``, with lists of numbers on one line each (the indices stay readable)."""
    text = json.dumps(results, indent=2, default=str)
    text = re.sub(
        r"\[\s+([-+\w.,\s]+?)\s+\]",
        lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",")) + "]",
        text,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(text + "\n")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; print the table; write ``results.json`` and figures under ``--out``.

    Args:
        argv: Command-line arguments (``None``: ``sys.argv[1:]``), e.g. ``["--quick"]``.

    Returns:
        The results: ``settings``, ``machine``, ``protocol`` (the pools' indices, every draw's
        labelled images, the normalisation, the shifts), ``pretraining``, ``hyper_parameters``
        (and ``selection`` with ``--select``), ``runs`` (``{name: {accuracies, accuracy,
        accuracy_std, shifted, vs_best_baseline, vs_full, seconds, ...}}``),
        ``best_baseline``, ``lr_sweep`` (with ``--lr-sweep``), ``figures`` and ``seconds``.

    Raises:
        DemoError: A flag the data cannot meet (more ``--shots`` than a digit has).
    """
    settings = parse_args(argv)
    with _threads(settings.threads):
        return _run(settings)


def _run(settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    config = settings.pretrain_config

    def progress(message: str) -> None:
        print(message, flush=True)

    progress(
        f"difflr demo: a slim ResNet pretrained on {len(glyph_classes(config.glyphs))} glyph "
        f"classes, fine-tuned on the UCI digits (10 classes) from {settings.shots} labels per "
        f"class, {settings.draws} draw(s); output in {settings.out}"
    )
    results: dict[str, Any] = {
        "settings": {
            **{
                k: v
                for k, v in dataclasses.asdict(settings).items()
                if k not in ("out", "cache_dir")
            },
            "out": str(settings.out),
            "cache_dir": None if settings.cache_dir is None else str(settings.cache_dir),
            "pretrain_config": config.as_dict(),
            "n_classes": N_CLASSES,
            "chance": 1 / N_CLASSES,
        },
        "machine": machine(),
        "seconds": {},
    }
    backbone = pretrained_backbone(
        config, cache_dir=settings.cache_dir, rebuild=settings.rebuild, progress=True
    )
    keys = ("path", "loaded_from_cache", "source_accuracy", "n_images", "classes")
    results["pretraining"] = {key: backbone.pretraining[key] for key in keys}
    results["pretraining"]["build_seconds"] = {
        "render": backbone.pretraining["render_seconds"],
        "train": backbone.pretraining["train_seconds"],
    }
    results["seconds"]["pretraining"] = time.perf_counter() - started
    progress(
        f"pretrained backbone: {'loaded' if results['pretraining']['loaded_from_cache'] else 'built'}"
        f" in {results['seconds']['pretraining']:.0f} s (source accuracy "
        f"{results['pretraining']['source_accuracy']:.3f} on held-out glyphs)"
    )
    levels, labels = uci_digits()
    pools = split_pools(labels)
    results["protocol"] = {
        **pools.as_dict(),
        "normalisation": {"mean": PIXEL_MEAN, "std": PIXEL_STD, "from": "the pretraining glyphs"},
        "shifts": SHIFTS,
        "confidence": 0.95,
    }
    chosen = default_choice(settings)
    results["hyper_parameters"] = {"chosen_by": "the committed selection (CHOSEN)", **chosen}
    if settings.select:
        phase = time.perf_counter()
        tasks = make_tasks(
            levels, labels, pools.selection, settings.selection_draws, settings, 500, False
        )
        results["protocol"]["selection_draws"] = [t.draw.train.tolist() for t in tasks]
        results["selection"] = select(tasks, backbone, settings, progress)
        chosen = results["selection"]["chosen"]
        results["hyper_parameters"] = {"chosen_by": "this run's selection", **chosen}
        results["seconds"]["selection"] = time.perf_counter() - phase
        write_results(results, settings.out)  # what finished survives a later failure
    phase = time.perf_counter()
    tasks = make_tasks(levels, labels, pools.evaluation, settings.draws, settings, 0, True)
    results["protocol"]["evaluation_draws"] = [t.draw.train.tolist() for t in tasks]
    runs, saved = evaluate_methods(tasks, backbone, chosen, settings)
    for name in RUN_NAMES:
        progress(f"{name}: " + " ".join(f"{a:.3f}" for a in runs[name]["scores"]["clean"]))
    results["best_baseline"] = summarise(runs)
    results["runs"] = runs
    results["seconds"]["evaluation"] = time.perf_counter() - phase
    write_results(results, settings.out)
    if settings.lr_sweep:
        phase = time.perf_counter()
        results["lr_sweep"] = lr_sweep(tasks, backbone, runs, settings, progress)
        results["seconds"]["lr_sweep"] = time.perf_counter() - phase
    figures = Figures(settings.out / "figures")
    figures.enabled = True
    figures.save("accuracy", lambda: plot_accuracy(results))
    if "lr_sweep" in results:
        figures.save("lr_sweep", lambda: plot_lr_sweep(results))
    results["figures"] = sorted(set(saved)) + figures.saved
    results["seconds"]["total"] = time.perf_counter() - started
    results["machine"]["load_at_end"] = list(os.getloadavg())
    write_results(results, settings.out)
    progress("\n" + format_table(results))
    progress(
        f"\n(whole job {results['seconds']['total']:.0f} s, of which "
        f"{results['seconds']['pretraining']:.0f} s for the backbone; load average "
        f"{results['machine']['load_at_start'][0]:.1f} at the start on "
        f"{results['machine']['cores']} cores)\nresults.json and figures/ are in {settings.out}"
    )
    return results


def cli() -> None:
    try:
        main()
    except DemoError as error:
        sys.exit(f"difflr.demo: {error}")


if __name__ == "__main__":
    cli()
