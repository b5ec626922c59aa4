"""Framework overhead per step, on a ~13k-parameter CNN (8x8 digits, batch 64, 4 layer groups)
where the model costs a couple of milliseconds a step and what the framework adds shows.

``learn.fit_one_cycle`` against a hand-written LightningModule with OneCycleLR, the same module
with difflr's ``ParamScheduler`` and ``Recorder`` in place of OneCycleLR, and a plain loop;
every contender runs the AdamW implementation the Learner chose. No validation, logger,
checkpoint or progress bar.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch.nn.functional as F

from benchmarks.common import (
    LEARNER_OFF,
    Config,
    Prepare,
    StepTimer,
    compare,
    differences,
    geometric_lrs,
    summary,
    tiny_cnn,
    tiny_data,
    tiny_groups,
)
from benchmarks.contenders import EQUAL_TRAINER_KWARGS, HandWrittenModule, plain_fit

LRS = geometric_lrs(1e-4, 1e-2, 4)
EXTRA_MS_TARGET = 0.3  # difflr's extra CPU ms per step over hand-written Lightning's


def make_learner(cfg: Config, callbacks: list[pl.Callback] | None = None) -> Any:
    from difflr import Learner

    # splitter=list: the Sequential's 4 children are the layer groups.
    return Learner(
        tiny_cnn(),
        tiny_data(cfg),
        F.cross_entropy,
        splitter=list,
        callbacks=callbacks,
        **LEARNER_OFF,
    )


def contenders(cfg: Config, opt_kwargs: dict[str, Any]) -> dict[str, Prepare]:
    def difflr() -> Callable[[], dict[str, Any]]:
        timer = StepTimer()
        learn = make_learner(cfg, [timer])

        def run() -> dict[str, Any]:
            learn.fit_one_cycle(cfg.tiny_epochs, slice(LRS[0], LRS[-1]))
            return {"starts": timer.starts}

        return run

    def lightning(difflr_callbacks: bool) -> Prepare:
        def prepare() -> Callable[[], dict[str, Any]]:
            from difflr import ParamScheduler, Recorder
            from difflr.policy.schedules import one_cycle_lr, one_cycle_mom

            timer = StepTimer()
            module = HandWrittenModule(
                tiny_cnn(), LRS, tiny_groups, opt_kwargs, one_cycle=not difflr_callbacks
            )
            callbacks: list[pl.Callback] = [timer]
            if difflr_callbacks:  # one LR per torch param group: two per layer group
                lr_sched = one_cycle_lr(np.repeat(LRS, 2))
                callbacks += [ParamScheduler(lr_sched, one_cycle_mom()), Recorder(log_hypers=False)]
            train_dl, _ = tiny_data(cfg)

            def run() -> dict[str, Any]:
                trainer = pl.Trainer(
                    max_epochs=cfg.tiny_epochs, callbacks=callbacks, **EQUAL_TRAINER_KWARGS
                )
                trainer.fit(module, train_dl)
                return {"starts": timer.starts}

            return run

        return prepare

    def plain() -> Callable[[], dict[str, Any]]:
        model, data = tiny_cnn(), tiny_data(cfg)
        return lambda: plain_fit(model, tiny_groups, LRS, data, cfg.tiny_epochs, opt_kwargs)

    return {
        "difflr": difflr,
        "lightning": lightning(difflr_callbacks=False),
        "lightning_with_difflr_callbacks": lightning(difflr_callbacks=True),
        "plain": plain,
    }


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    warm = Config(n_train=512, tiny_epochs=1)
    impl, runs = compare(contenders, make_learner(cfg), (warm, cfg), cfg.tiny_repeats, log)
    labels = {
        "plain": "plain PyTorch loop + `OneCycleLR`",
        "lightning": "hand-written LightningModule + `OneCycleLR`",
        "lightning_with_difflr_callbacks": "the same module with difflr's `ParamScheduler` + "
        "`Recorder` instead of `OneCycleLR`",
        "difflr": "difflr `learn.fit_one_cycle`",
    }
    rows = summary(runs, labels)
    for row, name in zip(rows, labels):
        extra = differences(runs, name, "plain", "cpu_ms_per_step")
        row["extra CPU ms / step over plain"] = statistics.median(extra)
    extra = differences(runs, "difflr", "lightning", "cpu_ms_per_step")
    step = differences(runs, "difflr", "lightning", "step_cpu_ms")
    return {
        "title": "4. Framework overhead on a tiny CNN",
        "description": (
            f"{sum(p.numel() for p in tiny_cnn().parameters()):,}-parameter CNN, 8x8 digits, "
            f"batch 64, 4 layer groups, {cfg.tiny_epochs} epochs a fit, no validation, "
            f"{impl['name']} AdamW in every contender, {cfg.tiny_repeats} interleaved repeats. "
            "*extra over plain*: median of the per-repeat differences to the plain loop."
        ),
        "difflr_optimizer": impl,
        "runs": runs,
        "tables": [{"rows": rows}],
        "targets": [
            {
                "comparison": "tiny CNN: difflr's extra CPU ms/step over hand-written Lightning "
                "(whole fit; median of the per-repeat differences)",
                "target": f"≤ {EXTRA_MS_TARGET} ms",
                "measured": f"{statistics.median(extra):+.2f} ms ({min(extra):+.2f} to "
                f"{max(extra):+.2f}); steady-state step {statistics.median(step):+.2f} ms",
                "holds": statistics.median(extra) <= EXTRA_MS_TARGET,
            }
        ],
    }
