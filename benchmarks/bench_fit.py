"""``learn.fit_one_cycle(2, slice(1e-5, 1e-3))`` against a hand-written LightningModule + Trainer
with torch's OneCycleLR, and against a plain PyTorch loop, on ResNet-18 / digits 32x32.

Timed: the fit call (difflr builds its Trainer inside it, so the hand-written contender's
Trainer construction is timed too). Untimed: building the model, the data and the Learner.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import (
    LR_HI,
    LR_LO,
    Comparison,
    Config,
    Prepare,
    StepTimer,
    adamw_one_cycle,
    cycle_time,
    digits,
    geometric_lrs,
    interleave,
    learner_off_switches,
    loaders,
    n_params,
    resnet18,
    resnet_groups,
    subset,
)
from benchmarks.contenders import EQUAL_TRAINER_KWARGS, HandWrittenModule, plain_fit


def _data(cfg: Config):
    train, valid = digits(32)
    return subset(train, cfg.n_train), subset(valid, cfg.n_valid)


def difflr_contender(cfg: Config, defaults: bool = False) -> Prepare:
    """``defaults``: the Learner's own logger (TensorBoard) and checkpointing (where it has
    one); else both off. The progress bar is off in every case."""
    from difflr import Learner

    def prepare() -> Callable[[], dict[str, Any]]:
        train_dl, valid_dl = loaders(*_data(cfg))
        path = tempfile.mkdtemp(prefix="difflr_bench_")
        switches = {"enable_progress_bar": False} if defaults else learner_off_switches()
        timer = StepTimer()
        learn = Learner(
            resnet18(),
            (train_dl, valid_dl),
            F.cross_entropy,
            path=path,
            callbacks=[timer],
            **switches,
        )

        def run() -> dict[str, Any]:
            try:
                learn.fit_one_cycle(cfg.epochs, slice(LR_LO, LR_HI))
            finally:
                shutil.rmtree(path, ignore_errors=True)
            rec = learn.recorder
            return {
                "n_groups": learn.n_groups,
                "n_param_groups": len(learn.opt.param_groups),
                "n_steps": len(rec.lrs),
                "valid_loss": rec.values[-1].get("valid_loss", float("nan")),
                "cycle_cpu_ms": 1e3 * timer.cycle("cpu"),
                "_lrs": rec.lrs,
            }

        return run

    return prepare


def lightning_contender(cfg: Config, defaults: bool = False) -> Prepare:
    """``defaults``: Lightning's default logger (TensorBoard when it is installed) and default
    checkpointing (a ModelCheckpoint saving at each epoch end); else both off."""

    def prepare() -> Callable[[], dict[str, Any]]:
        train_dl, valid_dl = loaders(*_data(cfg))
        module = HandWrittenModule(resnet18(), resnet_groups, geometric_lrs(LR_LO, LR_HI, 6))
        path = tempfile.mkdtemp(prefix="lightning_bench_")
        kwargs = {**EQUAL_TRAINER_KWARGS, "logger": defaults, "enable_checkpointing": defaults}
        timer = StepTimer()

        def run() -> dict[str, Any]:
            try:
                trainer = pl.Trainer(
                    max_epochs=cfg.epochs, default_root_dir=path, callbacks=[timer], **kwargs
                )
                trainer.fit(module, train_dl, valid_dl)
            finally:
                shutil.rmtree(path, ignore_errors=True)
            return {
                "n_steps": trainer.global_step,
                "valid_loss": float(trainer.callback_metrics["valid_loss"]),
                "cycle_cpu_ms": 1e3 * timer.cycle("cpu"),
            }

        return run

    return prepare


def plain_contender(cfg: Config) -> Prepare:
    def prepare() -> Callable[[], dict[str, Any]]:
        train_dl, valid_dl = loaders(*_data(cfg))
        model = resnet18()
        lrs = geometric_lrs(LR_LO, LR_HI, 6)

        def run() -> dict[str, Any]:
            starts: list[list[tuple[float, float]]] = []
            out = plain_fit(model, resnet_groups, lrs, train_dl, valid_dl, cfg.epochs, starts)
            return {
                "n_steps": cfg.epochs * len(train_dl),
                "cycle_cpu_ms": 1e3 * cycle_time(starts, "cpu"),
                **out,
            }

        return run

    return prepare


def schedule_agreement(difflr_lrs: np.ndarray) -> dict[str, float]:
    """How far difflr's per-step, per-group LRs are from OneCycleLR's for the same fit
    (fastai puts step i at pct i/N, torch at i/(N-1) per phase: they differ slightly)."""
    n_steps = len(difflr_lrs)
    model = resnet18()
    optimizer, scheduler = adamw_one_cycle(
        resnet_groups(model), geometric_lrs(LR_LO, LR_HI, 6), n_steps
    )
    torch_lrs = []
    for _ in range(n_steps):
        torch_lrs.append([g["lr"] for g in optimizer.param_groups][::2])  # one per layer group
        optimizer.step()
        scheduler.step()
    torch_lrs = np.array(torch_lrs)
    # Relative to each group's peak LR: near the end both are ~1e5 times smaller than the peak,
    # where a relative difference of the values themselves says nothing.
    rel = np.abs(difflr_lrs - torch_lrs) / torch_lrs.max(axis=0)
    return {
        "max_difference_over_peak": float(rel.max()),
        "median_difference_over_peak": float(np.median(rel)),
        "peak_lrs_difflr": difflr_lrs.max(axis=0).tolist(),
        "peak_lrs_onecyclelr": torch_lrs.max(axis=0).tolist(),
    }


def _pop_private(comparison: Comparison) -> dict[str, list[Any]]:
    private: dict[str, list[Any]] = {}
    for name, extras in comparison.extras.items():
        for extra in extras:
            for key in [k for k in extra if k.startswith("_")]:
                private.setdefault(f"{name}{key}", []).append(extra.pop(key))
    return private


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    n_train = len(_data(cfg)[0])
    result: dict[str, Any] = {
        "task": {
            "model": "torchvision resnet18(weights=None, num_classes=10)",
            "params": n_params(resnet18()),
            "data": "sklearn load_digits, 8x8 -> 32x32 bilinear, 3 channels",
            "n_train": n_train,
            "n_valid": len(_data(cfg)[1]),
            "batch_size": 64,
            "steps_per_epoch": -(-n_train // 64),
            "epochs": cfg.epochs,
            "lr_max": f"slice({LR_LO}, {LR_HI}) over 6 layer groups",
            "optimizer": "AdamW, 12 param groups (6 layer groups x decay/no-decay)",
        }
    }

    log("  warm-up (untimed): one short fit per contender")
    warm = Config(epochs=1, n_train=128, n_valid=128)
    interleave(
        {
            "difflr": difflr_contender(warm),
            "lightning": lightning_contender(warm),
            "plain": plain_contender(warm),
        },
        1,
        log=lambda s: None,
    )

    log("  logger and checkpointing off on both")
    comparison = interleave(
        {
            "difflr": difflr_contender(cfg),
            "lightning": lightning_contender(cfg),
            "plain": plain_contender(cfg),
        },
        cfg.fit_repeats,
        log=log,
    )
    private = _pop_private(comparison)
    result["no_logger"] = {
        **comparison.to_json(),
        "difflr_vs_lightning": comparison.ratios("difflr", "lightning"),
        "difflr_vs_plain": comparison.ratios("difflr", "plain"),
        "lightning_vs_plain": comparison.ratios("lightning", "plain"),
        "n_steps": comparison.extra("difflr", "n_steps"),
    }
    result["schedule_agreement"] = schedule_agreement(private["difflr_lrs"][0])

    if cfg.loggers:
        log("  defaults: each tool's own logger and checkpointing")
        comparison = interleave(
            {
                "difflr_defaults": difflr_contender(cfg, defaults=True),
                "lightning_defaults": lightning_contender(cfg, defaults=True),
            },
            cfg.defaults_repeats,
            log=log,
        )
        _pop_private(comparison)
        result["defaults"] = {
            **comparison.to_json(),
            "difflr_vs_lightning": comparison.ratios("difflr_defaults", "lightning_defaults"),
        }
    torch.set_grad_enabled(True)
    return result
