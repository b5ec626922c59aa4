"""``learn.lr_find`` against Lightning's ``Tuner.lr_find`` and a plain PyTorch sweep.

Every contender sweeps the same range (1e-7 to 10) for the same number of iterations, early
stopping off, so that each does exactly ``num_it`` training steps. Timed: the whole call
(difflr's snapshot, Trainer, sweep and restore; Lightning's Trainer, checkpoint, sweep,
validation and restore). Untimed: building model, data and Learner or module.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from lightning.pytorch.tuner import Tuner

from benchmarks.common import (
    LEARNER_OFF,
    LR_HI,
    LR_LO,
    Config,
    Prepare,
    compare,
    geometric_lrs,
    ratio_target,
    ratios,
    resnet18,
    resnet_data,
    resnet_groups,
    summary,
)
from benchmarks.contenders import EQUAL_TRAINER_KWARGS, HandWrittenModule, plain_sweep

START_LR, END_LR = 1e-7, 10.0
PLAIN_STEP_TARGET = 1.05  # difflr per iteration / a plain training step, same optimizer
DEFAULTS_TARGET = 0.85  # difflr's defaults / the Tuner with torch's default AdamW (issue 19)


def make_learner(cfg: Config) -> Any:
    from difflr import Learner

    return Learner(resnet18(), resnet_data(cfg), F.cross_entropy, **LEARNER_OFF)


def contenders(cfg: Config, opt_kwargs: dict[str, Any]) -> dict[str, Prepare]:
    n = cfg.lr_find_iters

    def difflr() -> Callable[[], dict[str, Any]]:
        learn = make_learner(cfg)

        def run() -> dict[str, Any]:
            learn.lr_find(START_LR, END_LR, num_it=n, stop_div=False, show_plot=False)
            return {"n_steps": len(learn.recorder.lrs)}

        return run

    def tuner(groups_fn: Any, kwargs: dict[str, Any]) -> Prepare:
        def prepare() -> Callable[[], dict[str, Any]]:
            lrs = geometric_lrs(LR_LO, LR_HI, 6)
            module = HandWrittenModule(resnet18(), lrs, groups_fn, kwargs, one_cycle=False)
            train_dl, valid_dl = resnet_data(cfg)

            def run() -> dict[str, Any]:
                path = tempfile.mkdtemp(prefix="lightning_bench_")  # for its checkpoint
                try:
                    trainer = pl.Trainer(
                        max_epochs=1000, default_root_dir=path, **EQUAL_TRAINER_KWARGS
                    )
                    finder = Tuner(trainer).lr_find(
                        module,
                        train_dl,
                        valid_dl,
                        min_lr=START_LR,
                        max_lr=END_LR,
                        num_training=n,
                        early_stop_threshold=None,
                        update_attr=False,
                    )
                finally:
                    shutil.rmtree(path, ignore_errors=True)
                return {"n_steps": len(finder.results["lr"])}

            return run

        return prepare

    def plain() -> Callable[[], dict[str, Any]]:
        model, (train_dl, _) = resnet18(), resnet_data(cfg)

        def run() -> dict[str, Any]:
            plain_sweep(model, resnet_groups, train_dl, (START_LR, END_LR, n), opt_kwargs)
            return {"n_steps": n}

        return run

    return {
        "difflr": difflr,
        "tuner": tuner(resnet_groups, opt_kwargs),
        "tuner_torch_defaults": tuner(None, {}),
        "plain": plain,
    }


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    learn, n = make_learner(cfg), cfg.lr_find_iters
    warm = Config(n_train=128, n_valid=128, lr_find_iters=3)
    impl, runs = compare(contenders, learn, (warm, cfg), cfg.lr_find_repeats, log)
    same = f"same {impl['name']} AdamW"
    labels = {
        "difflr": f"difflr `learn.lr_find`, its defaults ({impl['name']} {impl['optimizer']})",
        "tuner": f"Lightning `Tuner.lr_find`, 12 groups, {same}",
        "tuner_torch_defaults": "Lightning `Tuner.lr_find`, torch's defaults",
        "plain": f"plain PyTorch sweep, 12 groups, {same}",
    }
    difflr_over = ratios(runs)
    return {
        "title": "2. `lr_find` against Lightning's `Tuner.lr_find`",
        "description": (
            f"Same model and data as part 1; {n} iterations from {START_LR:g} to {END_LR:g}, "
            f"early stopping off in every contender, {cfg.lr_find_repeats} interleaved repeats; "
            "timed: the whole call. difflr snapshots and restores the model in memory and runs "
            "no validation; Lightning writes and reads back a checkpoint, shows a progress bar "
            "and, given a validation loader (as here), validates at every epoch end. The "
            "torch-defaults module's optimizer is `AdamW(self.parameters(), lr)`."
        ),
        "difflr_optimizer": impl,
        "runs": runs,
        "ratios": difflr_over,
        "tables": [{"rows": summary(runs, labels, unit="iteration")}],
        "targets": [
            ratio_target(
                "`lr_find` per iteration / a plain training step, same optimizer",
                difflr_over["difflr/plain"]["cpu_s"],
                PLAIN_STEP_TARGET,
            ),
            ratio_target(
                "`lr_find` / Lightning `Tuner.lr_find`, same optimizer implementation",
                difflr_over["difflr/tuner"]["cpu_s"],
                1,
                strict=True,
            ),
            ratio_target(
                f"`lr_find` per iteration with difflr's defaults ({impl['name']} AdamW) / "
                "`Tuner.lr_find` with torch's default AdamW",
                difflr_over["difflr/tuner_torch_defaults"]["cpu_s"],
                DEFAULTS_TARGET,
            ),
        ],
    }
