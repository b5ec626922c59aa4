"""``learn.lr_find`` against Lightning's ``Tuner.lr_find`` and a plain PyTorch sweep.

Timed runs use the same range (1e-7 to 10) and the same number of iterations for every
contender, with early stopping off, so that each does exactly ``num_it`` training steps. Timed:
the whole call (difflr's snapshot, Trainer, sweep and restore; Lightning's Trainer, checkpoint,
sweep, validation and restore). Untimed: building model, data and Learner/module.

The suggestions come from one extra, untimed sweep per tool with its defaults (difflr: 1e-7 to
10, stop at 4x the best loss; Lightning: 1e-8 to 1, the same stop), each rule then applied to both
curves.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch.nn.functional as F
from lightning.pytorch.tuner import Tuner

from benchmarks.common import (
    CLOCKS,
    LR_HI,
    LR_LO,
    Config,
    Prepare,
    digits,
    geometric_lrs,
    interleave,
    learner_off_switches,
    loaders,
    resnet18,
    resnet_groups,
    subset,
    swallow_stdout,
)
from benchmarks.contenders import EQUAL_TRAINER_KWARGS, HandWrittenModule, plain_sweep

START_LR, END_LR = 1e-7, 10.0


def _data(cfg: Config):
    train, valid = digits(32)
    return subset(train, cfg.n_train), subset(valid, cfg.n_valid)


def _learner(cfg: Config, path: str):
    from difflr import Learner

    train_dl, valid_dl = loaders(*_data(cfg))
    return Learner(
        resnet18(),
        (train_dl, valid_dl),
        F.cross_entropy,
        path=path,
        **learner_off_switches(),
    )


def difflr_contender(cfg: Config) -> Prepare:
    def prepare() -> Callable[[], dict[str, Any]]:
        path = tempfile.mkdtemp(prefix="difflr_bench_")
        learn = _learner(cfg, path)

        def run() -> dict[str, Any]:
            try:
                learn.lr_find(
                    START_LR, END_LR, num_it=cfg.lr_find_iters, stop_div=False, show_plot=False
                )
            finally:
                shutil.rmtree(path, ignore_errors=True)
            return {"iterations": len(learn.recorder.lrs)}

        return run

    return prepare


def _tuner_trainer(path: str, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        logger=False, default_root_dir=path, max_epochs=1000, **{**EQUAL_TRAINER_KWARGS, **kwargs}
    )


def lightning_contender(cfg: Config, with_validation: bool = True) -> Prepare:
    def prepare() -> Callable[[], dict[str, Any]]:
        train_dl, valid_dl = loaders(*_data(cfg))
        module = HandWrittenModule(
            resnet18(), resnet_groups, geometric_lrs(LR_LO, LR_HI, 6), one_cycle=False
        )
        path = tempfile.mkdtemp(prefix="lightning_bench_")

        def run() -> dict[str, Any]:
            try:
                trainer = _tuner_trainer(path)
                finder = Tuner(trainer).lr_find(
                    module,
                    train_dataloaders=train_dl,
                    val_dataloaders=valid_dl if with_validation else None,
                    min_lr=START_LR,
                    max_lr=END_LR,
                    num_training=cfg.lr_find_iters,
                    early_stop_threshold=None,
                    update_attr=False,
                )
            finally:
                shutil.rmtree(path, ignore_errors=True)
            return {"iterations": len(finder.results["lr"])}

        return run

    return prepare


def plain_contender(cfg: Config) -> Prepare:
    def prepare() -> Callable[[], dict[str, Any]]:
        train_dl, _ = loaders(*_data(cfg))
        model = resnet18()

        def run() -> dict[str, Any]:
            return plain_sweep(model, resnet_groups, train_dl, cfg.lr_find_iters, START_LR, END_LR)

        return run

    return prepare


def lightning_rule(lrs: np.ndarray, losses: np.ndarray) -> float:
    """Lightning's ``_LRFinder.suggestion()`` (steepest descent of the loss against the LR, on
    a linear LR axis, first 10 and last point dropped) applied to any curve."""
    from lightning.pytorch.tuner.lr_finder import _LRFinder

    finder = _LRFinder("exponential", float(lrs[0]), float(lrs[-1]), len(lrs))
    finder.results = {"lr": [float(v) for v in lrs], "loss": [float(v) for v in losses]}
    lr = finder.suggestion()
    return math.nan if lr is None else float(lr)


def valley_rule(lrs: np.ndarray, losses: np.ndarray) -> float:
    """difflr's ``valley`` as ``lr_find`` applies it: first ``num_it // 10`` and last 5 points
    dropped."""
    from difflr.lr_finder import make_suggestions, valley

    suggested, _ = make_suggestions((valley,), lrs, losses, skip_start=len(lrs) // 10)
    return float(suggested.valley)


def suggestions(cfg: Config) -> dict[str, Any]:
    """One default sweep per tool (untimed); both rules on both curves."""
    path = tempfile.mkdtemp(prefix="difflr_bench_")
    try:
        learn = _learner(cfg, path)
        own = learn.lr_find(num_it=cfg.lr_find_iters, show_plot=False)
        difflr_curve = (learn.recorder.lrs[:, -1].copy(), learn.recorder.losses.copy())
        train_dl, valid_dl = loaders(*_data(cfg))
        module = HandWrittenModule(
            resnet18(), resnet_groups, geometric_lrs(LR_LO, LR_HI, 6), one_cycle=False
        )
        finder = Tuner(_tuner_trainer(path)).lr_find(
            module, train_dl, valid_dl, num_training=cfg.lr_find_iters, update_attr=False
        )
        lightning_curve = (np.array(finder.results["lr"]), np.array(finder.results["loss"]))
        lightning_own = finder.suggestion()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    out: dict[str, Any] = {
        "difflr_default_sweep": {
            "range": "1e-7 .. 10, stop_div at 4x best",
            "points": len(difflr_curve[0]),
            "valley": valley_rule(*difflr_curve),
            "valley_as_returned_by_lr_find": float(own.valley),
            "lightning_rule": lightning_rule(*difflr_curve),
            "curve": {"lr": difflr_curve[0].tolist(), "loss": difflr_curve[1].tolist()},
        },
        "lightning_default_sweep": {
            "range": "1e-8 .. 1, early_stop_threshold 4.0",
            "points": len(lightning_curve[0]),
            "valley": valley_rule(*lightning_curve),
            "lightning_rule": lightning_rule(*lightning_curve),
            "lightning_rule_as_returned": math.nan if lightning_own is None else lightning_own,
            "curve": {"lr": lightning_curve[0].tolist(), "loss": lightning_curve[1].tolist()},
        },
    }
    return out


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    warm = Config(n_train=128, n_valid=128, lr_find_iters=3)
    log("  warm-up (untimed): one 3-step sweep per contender")
    interleave(
        {
            "difflr": difflr_contender(warm),
            "lightning": lightning_contender(warm),
            "plain": plain_contender(warm),
        },
        1,
        log=lambda s: None,
    )
    log(f"  {cfg.lr_find_iters}-iteration sweeps, early stopping off in all")
    comparison = interleave(
        {
            "difflr": difflr_contender(cfg),
            "lightning_tuner": lightning_contender(cfg),
            "lightning_tuner_no_val": lightning_contender(cfg, with_validation=False),
            "plain_sweep": plain_contender(cfg),
        },
        cfg.lr_find_repeats,
        log=log,
    )
    n = cfg.lr_find_iters
    result: dict[str, Any] = {
        **comparison.to_json(),
        "num_it": n,
        "range": [START_LR, END_LR],
        "per_iteration_ms": {
            clock: {k: 1e3 * comparison.median(k, clock) / n for k in comparison.names}
            for clock in CLOCKS
        },
        "difflr_vs_plain_step": comparison.ratios("difflr", "plain_sweep"),
        "difflr_vs_lightning": comparison.ratios("difflr", "lightning_tuner"),
        "difflr_vs_lightning_no_val": comparison.ratios("difflr", "lightning_tuner_no_val"),
        "lightning_vs_plain_step": comparison.ratios("lightning_tuner", "plain_sweep"),
    }
    if cfg.suggestions:
        log("  suggestions: one default sweep per tool (untimed)")
        with swallow_stdout():
            result["suggestions"] = suggestions(cfg)
    return result
