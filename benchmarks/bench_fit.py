"""``learn.fit_one_cycle(2, slice(1e-5, 1e-3))`` on ResNet-18 / digits 32x32, against
hand-written Lightning (with the Learner's optimizer implementation, and with torch's defaults)
and a plain PyTorch loop.

Timed: the fit call (difflr builds its Trainer inside it, so the hand-written contenders'
Trainer construction is timed too). Untimed: building model, data and Learner or module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch.nn.functional as F

from benchmarks.common import (
    LEARNER_OFF,
    LR_HI,
    LR_LO,
    Config,
    Prepare,
    StepTimer,
    adamw,
    compare,
    fastai_one_cycle,
    geometric_lrs,
    median,
    ratio_target,
    ratios,
    resnet18,
    resnet_data,
    resnet_groups,
    summary,
)
from benchmarks.contenders import EQUAL_TRAINER_KWARGS, HandWrittenModule, plain_fit

LRS = geometric_lrs(LR_LO, LR_HI, 6)
OVERHEAD_TARGET = 1.03  # difflr / hand-written Lightning, same optimizer implementation
DEFAULTS_TARGET = 0.85  # difflr's defaults / hand-written Lightning with torch's (issue 19)


def make_learner(cfg: Config, callbacks: list[pl.Callback] | None = None) -> Any:
    """``Learner(resnet18, data, F.cross_entropy)``: difflr's defaults, but no logger, per-epoch
    checkpoint or progress bar (the hand-written contenders have none either)."""
    from difflr import Learner

    return Learner(
        resnet18(), resnet_data(cfg), F.cross_entropy, callbacks=callbacks, **LEARNER_OFF
    )


def contenders(cfg: Config, opt_kwargs: dict[str, Any]) -> dict[str, Prepare]:
    """``opt_kwargs``: the implementation the Learner chose, for the overhead comparisons."""

    def difflr() -> Callable[[], dict[str, Any]]:
        timer = StepTimer()
        learn = make_learner(cfg, [timer])

        def run() -> dict[str, Any]:
            learn.fit_one_cycle(cfg.epochs, slice(LR_LO, LR_HI))
            valid_loss = learn.recorder.values[-1].get("valid_loss")
            return {"starts": timer.starts, "valid_loss": valid_loss, "lrs": learn.recorder.lrs}

        return run

    def lightning(groups_fn: Any, kwargs: dict[str, Any]) -> Prepare:
        def prepare() -> Callable[[], dict[str, Any]]:
            timer, module = StepTimer(), HandWrittenModule(resnet18(), LRS, groups_fn, kwargs)
            train_dl, valid_dl = resnet_data(cfg)

            def run() -> dict[str, Any]:
                trainer = pl.Trainer(
                    max_epochs=cfg.epochs, callbacks=[timer], **EQUAL_TRAINER_KWARGS
                )
                trainer.fit(module, train_dl, valid_dl)
                return {
                    "starts": timer.starts,
                    "valid_loss": float(trainer.callback_metrics["valid_loss"]),
                }

            return run

        return prepare

    def plain() -> Callable[[], dict[str, Any]]:
        model, data = resnet18(), resnet_data(cfg)
        return lambda: plain_fit(model, resnet_groups, LRS, data, cfg.epochs, opt_kwargs)

    return {
        "difflr": difflr,
        "lightning": lightning(resnet_groups, opt_kwargs),
        "lightning_torch_defaults": lightning(None, {}),
        "plain": plain,
    }


def schedule_agreement(difflr_lrs: np.ndarray) -> dict[str, float]:
    """How far difflr's per-step, per-group LRs are from OneCycleLR's for the same fit, relative
    to each group's peak (fastai puts step i at pct i/N, torch at i/(N-1) per phase)."""
    optimizer = adamw(resnet_groups(resnet18()), LRS, {})
    scheduler = fastai_one_cycle(optimizer, len(difflr_lrs))
    torch_lrs = []
    for _ in range(len(difflr_lrs)):
        torch_lrs.append([g["lr"] for g in optimizer.param_groups][::2])  # one per layer group
        optimizer.step()
        scheduler.step()
    rel = np.abs(difflr_lrs - np.array(torch_lrs)) / np.max(torch_lrs, axis=0)
    return {"max_difference_over_peak": rel.max(), "median_difference_over_peak": np.median(rel)}


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    learn = make_learner(cfg)
    warm = Config(n_train=512, n_valid=128)
    impl, runs = compare(contenders, learn, (warm, cfg), cfg.fit_repeats, log)
    difflr_lrs = [r.pop("lrs") for r in runs["difflr"]]  # arrays, not for the JSON
    same = f"same {impl['name']} AdamW"
    labels = {
        "difflr": f"difflr `fit_one_cycle`, its defaults ({impl['name']} {impl['optimizer']})",
        "lightning": f"hand-written Lightning, 12 groups + `OneCycleLR`, {same}",
        "lightning_torch_defaults": "hand-written Lightning, torch's defaults",
        "plain": f"plain PyTorch loop, 12 groups + `OneCycleLR`, {same}",
    }
    rows = summary(runs, labels)
    for row, name in zip(rows, labels):
        row["valid loss"] = median(runs[name], "valid_loss")
    difflr_over = ratios(runs)
    agreement = schedule_agreement(difflr_lrs[0])
    return {
        "title": "1. `fit_one_cycle` against hand-written Lightning and a plain loop",
        "description": (
            "torchvision ResNet-18 (`weights=None`, 10 classes) on sklearn's digits at 32x32, "
            f"batch 64, {cfg.epochs} epochs, a validation pass per epoch, {cfg.fit_repeats} "
            "interleaved repeats. difflr builds 12 param groups (6 layer groups x "
            "decay/no-decay); so do the first hand-written module and the plain loop, and they "
            "run the Learner's AdamW implementation: what differs is the framework. The "
            "torch-defaults module is what Lightning's docs show: `AdamW(self.parameters(), lr)`"
            " and `OneCycleLR(optimizer, lr, total_steps)`. Logging, checkpointing and progress "
            "bars off in all. *Steady-state step*: median time from one batch's start to the "
            "next (the optimizer step included); *fixed cost*: the rest of the fit (Trainer "
            "construction, setup, validation, teardown). difflr's per-step LRs differ from "
            f"`OneCycleLR`'s by at most {agreement['max_difference_over_peak']:.1%} of each "
            "group's peak (fastai puts step *i* at `pct = i/N`, torch at `i/(N-1)` per phase)."
        ),
        "difflr_optimizer": impl,
        "n_param_groups": len(learn.opt.param_groups),
        "runs": runs,
        "ratios": difflr_over,
        "schedule_agreement": agreement,
        "tables": [{"rows": rows}],
        "targets": [
            ratio_target(
                "`fit_one_cycle` / hand-written Lightning, same optimizer implementation "
                "(whole fit)",
                difflr_over["difflr/lightning"]["cpu_s"],
                OVERHEAD_TARGET,
            ),
            ratio_target(
                f"difflr's defaults ({impl['name']} AdamW) / hand-written Lightning with "
                "torch's defaults, ResNet-18 steady-state step",
                difflr_over["difflr/lightning_torch_defaults"]["step_cpu_ms"],
                DEFAULTS_TARGET,
            ),
        ],
    }
