"""The main job's settings: the methods it compares, the grids and budgets tried on the selection
pool, the hyper-parameters that selection chose, the pretraining sources, and the command line
(``python -m difflr.demo --help``) that fills a `Settings`, which ``results.json`` records.

The job itself is `difflr.demos.ablation`; its phases (the draws, the selection, the evaluation,
the LR sweep) are `difflr.demos.phases`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difflr.demos.backbone import TUTORIAL_PRETRAIN, PretrainConfig
from difflr.demos.baselines import BASELINE_NAMES, C_GRID
from difflr.demos.glyphs import GlyphConfig
from difflr.demos.recipes import RECIPE_NAMES, RunSpec

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
    "parse_args",
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
        default=min(2, os.cpu_count() or 1),
        help="worker processes for the runs, one torch thread each (default: 2, or 1 on a "
        "one-core machine; 1 runs them in this process); the results do not depend on it",
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
