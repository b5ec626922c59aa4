"""The LR range test (``Learner.lr_find``): a sweep that leaves the Learner as it was.

The sweep trains ``num_it`` steps with an exponentially growing LR per layer group, through the
Learner's public seam to Lightning (``learn.runner``), inside a transaction: everything it can
change is snapshotted first and restored bit for bit afterwards, also when it raises or is
interrupted. The curve is read by the suggestion functions of `difflr.policy.suggestions`.
"""

from __future__ import annotations

import copy
import math
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from difflr.callbacks.recorder import Recorder, SmoothedLoss
from difflr.callbacks.scheduler import ParamScheduler
from difflr.policy.lr import LRSpec, expand_lrs
from difflr.policy.schedules import exp_range
from difflr.policy.suggestions import SuggestedLRs, SuggestionFunc, make_suggestions, valley
from difflr.training.distributed import decide_on_rank_zero
from difflr.training.runner import Runner
from difflr.training.sharding import check_unsharded, reshard_optimizer_state, shard_like
from difflr.utils.checks import check_choice, check_int
from difflr.utils.files import safe_load

__all__ = ["Sweepable", "lr_find"]


class Sweepable(Protocol):
    """What the sweep needs of a Learner (the Learner sits above this module)."""

    module: pl.LightningModule
    opt: torch.optim.Optimizer
    recorder: Recorder
    runner: Runner
    path: Path

    @property
    def n_groups(self) -> int: ...


class _Snapshot:
    """Everything an LR range test can change, held so that it can be put back bit for bit.

    Parameters and buffers are copied into the same tensors (so the optimizer's references stay
    valid), the optimizer through its state dict (state and hyper-parameters), plus the
    ``requires_grad`` flags, gradients, train/eval modes and the torch, CUDA, numpy and python RNG
    states. ``to_disk`` (a folder) keeps the tensor copies in a file of their own there instead
    of memory (a unique name, so two sweeps never share it; read back without running code), for
    a model too
    large to hold twice.
    """

    def __init__(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, to_disk: Path | None
    ):
        self.tensors = dict(module.named_parameters()) | {
            f"buffer:{k}": v for k, v in module.named_buffers()
        }
        values = {k: v.detach().clone() for k, v in self.tensors.items()}
        grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
        opt_state = copy.deepcopy(optimizer.state_dict())
        self.file = None
        if to_disk is not None:
            to_disk.mkdir(parents=True, exist_ok=True)
            descriptor, name = tempfile.mkstemp(
                prefix=".lr_find_snapshot-", suffix=".pt", dir=to_disk
            )
            self.file = Path(name)
            with os.fdopen(descriptor, "wb") as handle:
                torch.save({"values": values, "grads": grads, "opt": opt_state}, handle)
            values, grads, opt_state = {}, {}, {}
        self.values, self.grads, self.opt_state = values, grads, opt_state
        self.flags = {k: p.requires_grad for k, p in module.named_parameters()}
        self.modes = {k: m.training for k, m in module.named_modules()}
        self.rng = (
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            np.random.get_state(),
            random.getstate(),
        )

    def restore(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        values, grads, opt_state = self.values, self.grads, self.opt_state
        if self.file is not None:
            saved = safe_load(self.file, "lr_find snapshot")
            values, grads, opt_state = saved["values"], saved["grads"], saved["opt"]
            self.file.unlink(missing_ok=True)
        # Under ModelParallelStrategy the sweep's Trainer may have sharded the model (its first
        # Trainer does): the values then go, cut into shards, into the new parameters.
        now = dict(module.named_parameters()) | {
            f"buffer:{k}": v for k, v in module.named_buffers()
        }
        with torch.no_grad():
            for key, tensor in self.tensors.items():
                target = now.get(key, tensor)
                target.copy_(shard_like(values[key], target))
        for key, p in module.named_parameters():
            p.requires_grad_(self.flags[key])
            grad = grads.get(key)
            p.grad = None if grad is None else shard_like(grad, p)
        optimizer.load_state_dict(opt_state)
        reshard_optimizer_state(optimizer)
        for key, m in module.named_modules():
            m.training = self.modes[key]
        torch_rng, cuda_rng, np_rng, py_rng = self.rng
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


class _StopOnDivergence(Callback):
    """Stop the sweep once the smoothed loss exceeds ``factor`` times the best, or is not finite.

    Tested once per optimizer step, on that step's loss (the mean of its micro-batches under
    gradient accumulation) smoothed as the Recorder smooths it, so the recorded curve shows the
    rise that stopped the sweep. Reads the loss on the host (one synchronisation per step, as any
    LR finder must). Under DDP, global rank 0 decides from its own loss and every rank follows at
    the same batch (a rank that stopped alone would leave the others waiting in DDP's
    all-reduce).
    """

    def __init__(self, factor: float = 4.0) -> None:
        self.factor = factor
        self.best = math.inf
        self.ema = SmoothedLoss()
        self._step_losses: list[float] = []
        self._stepped = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Lightning hands over the loss divided by accumulate_grad_batches.
            self._step_losses.append(float(loss) * trainer.accumulate_grad_batches)
        if not self._stepped:
            return  # the optimizer step of these micro-batches is still to come
        self._stepped = False
        if not self._step_losses:
            return  # every batch of the step was skipped
        smoothed = self.ema.update(sum(self._step_losses) / len(self._step_losses))
        self._step_losses = []
        stop = not math.isfinite(smoothed) or smoothed > self.factor * self.best
        if trainer.world_size > 1:
            stop = trainer.strategy.broadcast(stop, src=0)
        if stop:
            trainer.should_stop = True
        self.best = min(self.best, smoothed)


class _StopOnEmptyEpoch(Callback):
    """Refuse a loader that yields no batch: the sweep repeats epochs until it has made its
    steps, which would never end."""

    def __init__(self) -> None:
        self._batches = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._batches == 0:
            raise ValueError(
                "the training loader yielded no batch, so the sweep could make no step; check the "
                "dataset (an empty IterableDataset?), its batch_size and drop_last, and "
                "limit_train_batches."
            )


def lr_find(
    learn: Sweepable,
    start_lr: LRSpec = 1e-7,
    end_lr: LRSpec = 10.0,
    num_it: int = 100,
    stop_div: bool = True,
    show_plot: bool = True,
    suggest_funcs: SuggestionFunc | Sequence[SuggestionFunc] | None = (valley,),
    snapshot: str = "memory",
) -> SuggestedLRs | None:
    """Run the LR range test on ``learn`` and put everything back as it was.

    See `difflr.Learner.lr_find` for the arguments. ``suggest_funcs=None`` (or ``()``) only
    records and plots the sweep, and returns ``None``.
    """
    n_groups = learn.n_groups
    starts = np.array(expand_lrs(start_lr, n_groups, name="start_lr"))
    ends = np.array(expand_lrs(end_lr, n_groups, name="end_lr"))
    if np.any(starts >= ends):
        raise ValueError(
            f"start_lr must be below end_lr for every layer group, got start_lr={start_lr!r} "
            f"and end_lr={end_lr!r}; e.g. lr_find(start_lr=1e-7, end_lr=10)."
        )
    num_it = check_int(num_it, "num_it", 2, what="sweep iterations")
    check_choice(snapshot, "snapshot", ("memory", "disk"))
    if snapshot == "disk":
        check_unsharded(
            learn.module,
            'lr_find(snapshot="disk")',
            'use snapshot="memory" (each rank then holds a copy of its own shard only)',
        )
    funcs = _suggestion_funcs(suggest_funcs)
    if learn.runner.trainer_kwargs.get("limit_train_batches") in (0, 0.0):
        raise ValueError(
            "limit_train_batches=0 leaves the sweep no batch to train on; lr_find needs at least "
            "one (drop limit_train_batches, or pass a positive one)."
        )

    scheduler = ParamScheduler(exp_range(starts, ends), None, total_steps=num_it)
    callbacks = [scheduler, _StopOnEmptyEpoch(), *([_StopOnDivergence()] if stop_div else [])]
    # Not a fit: no epoch table, NaN guard (the sweep's own rule handles a loss that is not
    # finite), user callbacks, checkpoints, logs or validation. The live line counts the
    # sweep's iterations (unless the Learner has enable_progress_bar=False).
    trainer = learn.runner.trainer(
        callbacks,
        standard=False,
        progress_label="lr_find",
        max_steps=num_it,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
    )
    saved = _Snapshot(learn.module, learn.opt, learn.path if snapshot == "disk" else None)
    learn.recorder.reset()
    try:
        learn.runner.fit(trainer, scheduler, log=False)
    finally:
        saved.restore(learn.module, learn.opt)

    rec = learn.recorder

    def suggest() -> tuple[SuggestedLRs | None, dict[str, tuple[float, float]]]:
        if not funcs:
            return None, {}
        lrs, losses = rec.lrs[:, -1], rec.losses
        n = min(len(lrs), len(losses))
        return make_suggestions(funcs, lrs[:n], losses[:n], skip_start=num_it // 10)

    # Under DDP each rank recorded the loss of its own shard: rank 0's curve decides, for all.
    suggested, points = decide_on_rank_zero(trainer, suggest)
    rec.lr_find_points = points
    if show_plot and trainer.is_global_zero:
        from difflr.plotting import show

        show(rec.plot_lr_find())
    return suggested


def _suggestion_funcs(suggest_funcs: Any) -> tuple[SuggestionFunc, ...]:
    if suggest_funcs is None:
        return ()
    if callable(suggest_funcs):
        return (suggest_funcs,)
    funcs = tuple(suggest_funcs) if isinstance(suggest_funcs, (list, tuple)) else (None,)
    if not all(callable(func) for func in funcs):
        raise TypeError(
            f"suggest_funcs must be a suggestion function (lrs, losses) -> lr, a list of them, or "
            f"None for none; got {suggest_funcs!r}."
        )
    return funcs
