"""Framework overhead: difflr's per-step callbacks alone, and the whole Learner on a tiny CNN.

1. **Callbacks alone.** ``ParamScheduler`` and ``Recorder`` hooks called directly in a tight loop
   with a stand-in trainer (no model, no data), on an AdamW with 6 or 60 layer groups (two torch
   param groups each, as difflr builds them). Per simulated step: every per-batch hook the
   callbacks override, in Lightning's order; every 25 steps their epoch-end and epoch-start
   hooks (the recorder's flush). For reference, what the
   hand-written module pays for the same job: ``OneCycleLR.step()`` on the same optimizer.
2. **The whole Learner on a ~13k-parameter CNN** (8x8 digits, batch 64, 4 layer groups), where
   the model costs about a millisecond a step: ``learn.fit_one_cycle`` vs a hand-written
   LightningModule with OneCycleLR vs a plain loop (and the hand-written module with difflr's
   two callbacks in place of OneCycleLR). No validation set, no logger, no progress bar. Per step:
   the whole fit's time over its steps, and the steady-state cycle (median time from one batch's
   start to the next).
"""

from __future__ import annotations

import functools
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmarks.common import (
    BATCH_SIZE,
    CLOCKS,
    Config,
    Prepare,
    StepTimer,
    cycle_time,
    digits,
    geometric_lrs,
    interleave,
    learner_off_switches,
    loaders,
    n_params,
    subset,
    tiny_cnn,
    tiny_groups,
    tiny_splitter,
)
from benchmarks.contenders import EQUAL_TRAINER_KWARGS, HandWrittenModule, plain_fit

TINY_LO, TINY_HI = 1e-4, 1e-2
STEPS_PER_EPOCH = 25


# ----------------------------------------------------------------------------- callbacks alone
class _NullLogger:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def _optimizer(n_groups: int) -> torch.optim.Optimizer:
    params = [nn.Parameter(torch.zeros(4)) for _ in range(2 * n_groups)]
    groups = []
    for i in range(n_groups):
        groups.append({"params": [params[2 * i]], "name": f"{i}.g", "layer_group": i})
        groups.append(
            {
                "params": [params[2 * i + 1]],
                "name": f"{i}.g/no_decay",
                "layer_group": i,
                "no_decay": True,
                "weight_decay": 0.0,
            }
        )
    return torch.optim.AdamW(groups, lr=1e-3)


def _fake_trainer(optimizer: torch.optim.Optimizer, steps: int, log: bool) -> SimpleNamespace:
    """The attributes of ``pl.Trainer`` that the two callbacks read."""
    loggers = [_NullLogger()] if log else []
    return SimpleNamespace(
        optimizers=[optimizer],
        estimated_stepping_batches=steps,
        max_steps=-1,
        loggers=loggers,
        logger=loggers[0] if loggers else None,
        global_step=0,
        log_every_n_steps=1,
        accumulate_grad_batches=1,
        current_epoch=0,
        callback_metrics={},
        is_global_zero=True,
        should_stop=False,
        world_size=1,
        global_rank=0,
        sanity_checking=False,
    )


#: Lightning's per-batch hooks in the order automatic optimization calls them.
STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_zero_grad",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
)


def _step_calls(callback: Callback, trainer: Any, optimizer: Any, loss: Any) -> list[Callable]:
    """The per-batch hooks ``callback`` overrides, bound to their arguments; whichever hooks
    a version of difflr uses, all of them are timed."""
    args = {
        "on_train_batch_start": (trainer, None, None, 0),
        "on_before_zero_grad": (trainer, None, optimizer),
        "on_before_backward": (trainer, None, loss["loss"]),
        "on_after_backward": (trainer, None),
        "on_before_optimizer_step": (trainer, None, optimizer),
        "on_train_batch_end": (trainer, None, loss, None, 0),
    }
    calls = []
    for hook in STEP_HOOKS:
        if getattr(type(callback), hook) is not getattr(Callback, hook):
            calls.append(functools.partial(getattr(callback, hook), *args[hook]))
    return calls


def _epoch_calls(callback: Callback, trainer: Any) -> list[Callable]:
    return [
        functools.partial(getattr(callback, hook), trainer, None)
        for hook in ("on_train_epoch_end", "on_train_epoch_start")
        if getattr(type(callback), hook) is not getattr(Callback, hook)
    ]


def time_callbacks(n_groups: int, steps: int, which: str = "both", log: bool = False) -> float:
    """CPU seconds per simulated step of ``which`` ('both', 'scheduler', 'recorder',
    'onecyclelr')."""
    from difflr.callbacks import ParamScheduler, Recorder
    from difflr.schedules import one_cycle_lr, one_cycle_mom

    optimizer = _optimizer(n_groups)
    trainer = _fake_trainer(optimizer, steps, log)
    loss = {"loss": torch.tensor(1.0)}
    if which == "onecyclelr":
        lrs = [lr for lr in geometric_lrs(1e-5, 1e-3, n_groups) for _ in range(2)]
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lrs, total_steps=steps + 1, cycle_momentum=True
        )
        t0 = time.process_time()
        for _ in range(steps):
            scheduler.step()
        return (time.process_time() - t0) / steps

    callbacks: list[Callback] = []
    if which in ("both", "scheduler"):
        callbacks.append(
            ParamScheduler(
                one_cycle_lr(np.array(geometric_lrs(1e-5, 1e-3, n_groups))), one_cycle_mom()
            )
        )
    if which in ("both", "recorder"):
        callbacks.append(Recorder(log_hypers=log))
    for callback in callbacks:
        callback.on_train_start(trainer, None)
        if hasattr(callback, "on_train_epoch_start"):
            callback.on_train_epoch_start(trainer, None)
    step_calls = [c for cb in callbacks for c in _step_calls(cb, trainer, optimizer, loss)]
    epoch_calls = [c for cb in callbacks for c in _epoch_calls(cb, trainer)]
    t0 = time.process_time()
    for step in range(steps):
        for call in step_calls:
            call()
        trainer.global_step += 1
        if (step + 1) % STEPS_PER_EPOCH == 0:
            for call in epoch_calls:
                call()
    return (time.process_time() - t0) / steps


def callbacks_alone(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    cases = [
        (n, which, logged)
        for n in (6, 60)
        for which, logged in (
            ("both", False),
            ("both", True),
            ("scheduler", False),
            ("recorder", False),
            ("onecyclelr", False),
        )
    ]
    times: dict[str, list[float]] = {}
    for _ in range(cfg.micro_repeats):
        for n, which, logged in cases:  # interleaved: every case once per repeat
            key = f"{which}{'+log_every_step' if logged else ''}/{n}"
            times.setdefault(key, []).append(time_callbacks(n, cfg.micro_steps, which, logged))
    out: dict[str, Any] = {}
    for key, values in times.items():
        which, n = key.rsplit("/", 1)
        us = 1e6 * statistics.median(values)
        out.setdefault(which, {})[f"{n}_groups"] = {
            "us_per_step": us,
            "us_per_step_per_group": us / int(n),
        }
        log(f"    {which:<22s} {n:>3s} groups  {us:8.1f} us/step  {us / int(n):6.2f} us/step/group")
    return out


# ----------------------------------------------------------------------------- tiny CNN
def _tiny_data(cfg: Config):
    train, _ = digits(8, channels=1)
    return subset(train, cfg.n_train)


def _cycles(starts) -> dict[str, float]:
    return {f"cycle_{clock}_ms": 1e3 * cycle_time(starts, clock) for clock in CLOCKS}


def difflr_contender(cfg: Config) -> Prepare:
    from difflr import Learner

    def prepare() -> Callable[[], dict[str, Any]]:
        train_dl, _ = loaders(_tiny_data(cfg), None)
        timer = StepTimer()
        path = tempfile.mkdtemp(prefix="difflr_bench_")
        learn = Learner(
            tiny_cnn(),
            (train_dl, None),
            F.cross_entropy,
            splitter=tiny_splitter,
            path=path,
            callbacks=[timer],
            **learner_off_switches(),
        )

        def run() -> dict[str, Any]:
            try:
                learn.fit_one_cycle(cfg.tiny_epochs, slice(TINY_LO, TINY_HI))
            finally:
                shutil.rmtree(path, ignore_errors=True)
            return {"n_steps": len(learn.recorder.lrs), **_cycles(timer.starts)}

        return run

    return prepare


def lightning_contender(cfg: Config, difflr_callbacks: bool = False) -> Prepare:
    def prepare() -> Callable[[], dict[str, Any]]:
        from difflr.callbacks import ParamScheduler, Recorder
        from difflr.schedules import one_cycle_lr, one_cycle_mom

        train_dl, _ = loaders(_tiny_data(cfg), None)
        timer = StepTimer()
        lrs = geometric_lrs(TINY_LO, TINY_HI, 4)
        module = HandWrittenModule(tiny_cnn(), tiny_groups, lrs, one_cycle=not difflr_callbacks)
        callbacks: list[pl.Callback] = [timer]
        if difflr_callbacks:
            # One LR per torch param group (two per layer group, no "layer_group" key).
            per_param_group = np.repeat(lrs, 2)
            callbacks += [
                ParamScheduler(one_cycle_lr(per_param_group), one_cycle_mom()),
                Recorder(log_hypers=False),
            ]
        path = tempfile.mkdtemp(prefix="lightning_bench_")

        def run() -> dict[str, Any]:
            try:
                trainer = pl.Trainer(
                    max_epochs=cfg.tiny_epochs,
                    logger=False,
                    default_root_dir=path,
                    callbacks=callbacks,
                    **EQUAL_TRAINER_KWARGS,
                )
                trainer.fit(module, train_dl)
            finally:
                shutil.rmtree(path, ignore_errors=True)
            return {"n_steps": trainer.global_step, **_cycles(timer.starts)}

        return run

    return prepare


def plain_contender(cfg: Config) -> Prepare:
    def prepare() -> Callable[[], dict[str, Any]]:
        train_dl, _ = loaders(_tiny_data(cfg), None)
        model = tiny_cnn()
        lrs = geometric_lrs(TINY_LO, TINY_HI, 4)

        def run() -> dict[str, Any]:
            starts: list[list[tuple[float, float]]] = []
            plain_fit(model, tiny_groups, lrs, train_dl, None, cfg.tiny_epochs, starts)
            return {"n_steps": cfg.tiny_epochs * len(train_dl), **_cycles(starts)}

        return run

    return prepare


def _paired(values: list[float], baseline: list[float]) -> dict[str, float]:
    diffs = [a - b for a, b in zip(values, baseline)]
    return {"median": statistics.median(diffs), "min": min(diffs), "max": max(diffs)}


def tiny_cnn_overhead(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    contenders = {
        "difflr": difflr_contender(cfg),
        "lightning": lightning_contender(cfg),
        "lightning_with_difflr_callbacks": lightning_contender(cfg, difflr_callbacks=True),
        "plain": plain_contender(cfg),
    }
    warm = Config(n_train=512, tiny_epochs=1)  # >= 8 steps: OneCycleLR divides by zero below
    interleave(
        {
            "difflr": difflr_contender(warm),
            "lightning": lightning_contender(warm),
            "lightning_cb": lightning_contender(warm, True),
            "plain": plain_contender(warm),
        },
        1,
        log=lambda s: None,
    )
    comparison = interleave(contenders, cfg.tiny_repeats, log=log)
    steps = comparison.extra("plain", "n_steps")
    names = comparison.names
    result: dict[str, Any] = {
        **comparison.to_json(),
        "model_params": n_params(tiny_cnn()),
        "batch_size": BATCH_SIZE,
        "epochs": cfg.tiny_epochs,
        "n_steps": steps,
        "difflr_vs_lightning": comparison.ratios("difflr", "lightning"),
    }
    for clock in CLOCKS:
        per_step = {n: 1e3 * comparison.median(n, clock) / steps for n in names}
        cycle = {n: comparison.extra(n, f"cycle_{clock}_ms") for n in names}
        result[clock] = {
            "per_step_ms": per_step,
            "cycle_ms": cycle,
            "extra_ms_per_step_over_plain": {
                n: per_step[n] - per_step["plain"] for n in names if n != "plain"
            },
            "extra_cycle_ms_over_plain": {
                n: cycle[n] - cycle["plain"] for n in names if n != "plain"
            },
            # What is not in the steady-state steps: Trainer construction, setup, epoch
            # starts and ends, teardown.
            "fixed_cost_per_fit_ms": {
                n: 1e3 * comparison.median(n, clock) - steps * cycle[n] for n in names
            },
            "difflr_minus_lightning_ms_per_step": per_step["difflr"] - per_step["lightning"],
            "difflr_minus_lightning_cycle_ms": cycle["difflr"] - cycle["lightning"],
            # The same differences taken within each repeat (the two ran back to back), then
            # the median: less sensitive to the machine's load changing between repeats.
            "paired_minus_lightning_ms_per_step": _paired(
                [1e3 * t / steps for t in comparison.times[clock]["difflr"]],
                [1e3 * t / steps for t in comparison.times[clock]["lightning"]],
            ),
            "paired_minus_lightning_cycle_ms": _paired(
                [e[f"cycle_{clock}_ms"] for e in comparison.extras["difflr"]],
                [e[f"cycle_{clock}_ms"] for e in comparison.extras["lightning"]],
            ),
        }
    return result


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    log(f"  callbacks alone: {cfg.micro_steps} simulated steps x {cfg.micro_repeats} repeats")
    callbacks = callbacks_alone(cfg, log)
    log(f"  tiny CNN: {cfg.tiny_epochs} epochs per fit, no validation, interleaved")
    return {"callbacks_alone": callbacks, "tiny_cnn": tiny_cnn_overhead(cfg, log)}
