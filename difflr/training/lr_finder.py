"""The LR range test (``Learner.lr_find``): a sweep that leaves the Learner as it was.

The sweep trains ``num_it`` steps with an exponentially growing LR per layer group, through the
Learner's public seam to Lightning (``learn.runner``), inside a transaction: everything it can
change is snapshotted first and restored bit for bit afterwards, also when it raises or is
interrupted. The curve is read by the suggestion functions of `difflr.policy.suggestions`.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from difflr.callbacks.guards import EmptyEpochGuard
from difflr.callbacks.recorder import Recorder
from difflr.callbacks.scheduler import ParamScheduler
from difflr.callbacks.step_loss import StepLosses
from difflr.policy.lr import LRSpec, expand_lrs
from difflr.policy.schedules import Schedule, exp_range, sched_lin
from difflr.policy.suggestions import (
    SuggestedLRs,
    SuggestionFunc,
    make_suggestions,
    suggestion_funcs,
    valley,
)
from difflr.training.distributed import decide_on_rank_zero
from difflr.training.runner import Runner
from difflr.training.sharding import check_unsharded, reshard_optimizer_state, shard_like
from difflr.utils.checks import check_choice, check_int
from difflr.utils.files import (
    CHECKSUM_KEY,
    UnreadableFileError,
    checksum,
    os_error_behind,
    remove_stale_temps,
    safe_load,
)
from difflr.utils.rng import RngState

__all__ = [
    "SWEEP_MODES",
    "Sweepable",
    "lr_find",
    "range_test",
    "sweep_bounds",
    "sweep_schedule",
]


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
    states. ``to_disk`` (a folder) keeps the tensor copies in a file there instead of memory, for
    a model too large to hold twice: a file deleted from the folder as soon as it is made and
    read back through the open handle, so no other process can alter it, and the system frees it
    whatever ends the process (a SIGKILL included). It is read back without running code and its
    checksum verified.
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
        self.handle = None
        if to_disk is not None:
            # Snapshots of older difflr versions kept a name, and a kill left them behind.
            remove_stale_temps(to_disk, (".lr_find_snapshot-",))
            self.handle = _write_anonymous(
                {"values": values, "grads": grads, "opt": opt_state}, to_disk
            )
            values, grads, opt_state = {}, {}, {}
        self.to_disk = to_disk
        self.values, self.grads, self.opt_state = values, grads, opt_state
        self.flags = {k: p.requires_grad for k, p in module.named_parameters()}
        self.modes = {k: m.training for k, m in module.named_modules()}
        self.rng = RngState.capture()

    def restore(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # Flags, modes and RNG first: they come back even if the disk snapshot cannot be read.
        for key, p in module.named_parameters():
            p.requires_grad_(self.flags[key])
        for key, m in module.named_modules():
            m.training = self.modes[key]
        self.rng.restore()
        values, grads, opt_state = self.values, self.grads, self.opt_state
        if self.handle is not None:
            try:
                with self.handle:
                    self.handle.seek(0)
                    saved = safe_load(
                        self.to_disk / "(lr_find snapshot)", "lr_find snapshot", self.handle
                    )
            except UnreadableFileError as error:
                raise UnreadableFileError(
                    f"{error} The model now holds the sweep's last weights, not yours (its "
                    "requires_grad flags, modes and RNG states are back): load a state you saved "
                    "(learn.load), or use snapshot='memory'."
                ) from None
            finally:
                self.handle = None
            values, grads, opt_state = saved["values"], saved["grads"], saved["opt"]
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
            grad = grads.get(key)
            p.grad = None if grad is None else shard_like(grad, p)
        optimizer.load_state_dict(opt_state)
        reshard_optimizer_state(optimizer)


def _write_anonymous(content: dict[str, Any], folder: Path) -> Any:
    """``content`` (with its checksum) in a file of ``folder`` that has no name: an open handle
    the caller reads back and closes.

    Raises:
        OSError: The write failed (a full disk); names the folder, nothing is left behind.
    """
    handle = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Unlinked at once (O_TMPFILE where the system has it); handed to the caller.
        handle = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115
        torch.save({**content, CHECKSUM_KEY: checksum(content)}, handle)
        handle.flush()
    except Exception as error:
        if handle is not None:
            handle.close()
        cause = os_error_behind(error)
        if cause is None:
            raise
        raise OSError(
            cause.errno,
            f"lr_find(snapshot='disk') could not write its snapshot in {folder} "
            f"({cause.strerror or cause}); nothing was changed and the sweep did not start. Free "
            "disk space, or use snapshot='memory'.",
        ) from error
    return handle


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
        self.step_losses = StepLosses()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.step_losses.step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_losses.batch_end(outputs, trainer.accumulate_grad_batches)
        # Normally one step per batch; none while micro-batches accumulate.
        for smoothed in self.step_losses.read():
            if smoothed is None:
                continue  # every batch of the step was skipped
            stop = not math.isfinite(smoothed) or smoothed > self.factor * self.best
            if trainer.world_size > 1:
                stop = trainer.strategy.broadcast(stop, src=0)
            if stop:
                trainer.should_stop = True
            self.best = min(self.best, smoothed)


def sweep_bounds(
    start: LRSpec,
    end: LRSpec,
    n_groups: int,
    names: tuple[str, str] = ("start_lr", "end_lr"),
    example: str = "lr_find(start_lr=1e-7, end_lr=10)",
) -> tuple[np.ndarray, np.ndarray]:
    """A sweep's first and last LR of every layer group, checked.

    Args:
        start: First LR: a float, a list per group or a slice (see ``expand_lrs``).
        end: Last LR, above ``start`` for every group.
        n_groups: Number of layer groups.
        names: The two arguments' names, for messages.
        example: A call with good bounds, for messages.

    Raises:
        ValueError: A bound is not positive, has the wrong length, or ``start >= end`` for a
            group.
    """
    starts = np.array(expand_lrs(start, n_groups, name=names[0]))
    ends = np.array(expand_lrs(end, n_groups, name=names[1]))
    if np.any(starts >= ends):
        raise ValueError(
            f"{names[0]} must be below {names[1]} for every layer group, got {names[0]}="
            f"{start!r} and {names[1]}={end!r}; e.g. {example}."
        )
    return starts, ends


#: How the LR grows from step to step of a sweep.
SWEEP_MODES = ("exponential", "linear")


def sweep_schedule(starts: np.ndarray, ends: np.ndarray, mode: str = "exponential") -> Schedule:
    """The sweep's LR of every group at ``pct`` (step ``i`` of ``num_it``: ``pct = i / num_it``):
    ``start * (end / start) ** pct`` (``"exponential"``) or ``start + (end - start) * pct``
    (``"linear"``). Both keep list or slice bounds' ratios at the first and last step; the
    exponential sweep keeps them at every step."""
    check_choice(mode, "mode", SWEEP_MODES)
    if mode == "linear":
        return lambda pct: sched_lin(starts, ends, pct)
    return exp_range(starts, ends)


def range_test(
    module: pl.LightningModule,
    optimizer: torch.optim.Optimizer,
    recorder: Recorder,
    make_trainer: Callable[[list[Callback]], pl.Trainer],
    fit: Callable[[pl.Trainer, ParamScheduler], None],
    schedule: Schedule,
    num_it: int,
    *,
    stop_factor: float | None = 4.0,
    funcs: Sequence[SuggestionFunc] = (valley,),
    show_plot: bool = False,
    to_disk: Path | None = None,
) -> tuple[SuggestedLRs | None, pl.Trainer]:
    """The range test as a transaction, for ``Learner.lr_find`` and the `LRFinder` callback alike.

    Builds the sweep's Trainer with ``make_trainer(callbacks)`` (its callbacks: the sweep's
    scheduler, the empty-epoch guard and the divergence stop), snapshots ``module`` and
    ``optimizer`` (`_Snapshot`), resets ``recorder`` (which that Trainer must carry), runs
    ``fit(trainer, scheduler)``, and restores the snapshot whatever happens. The suggestions are
    read off ``recorder``'s curve (the head group's LR, the first ``num_it // 10`` points
    dropped) on global rank 0 and sent to every rank.

    Args:
        module: The module that trains.
        optimizer: Its optimizer (its state is restored too).
        recorder: Records the sweep; keeps it afterwards (``lr_find_points`` set).
        make_trainer: ``callbacks -> Trainer`` that runs the sweep.
        fit: Trains ``trainer`` for the sweep (``num_it`` steps at most).
        schedule: Every group's LR as a function of ``pct`` (`sweep_schedule`).
        num_it: Number of optimizer steps (checked by the caller).
        stop_factor: Stop once the smoothed loss exceeds this many times the best or is not
            finite; ``None`` never stops early.
        funcs: Suggestion functions (empty: none, and ``None`` is returned).
        show_plot: Show the loss-vs-LR figure (on global rank 0).
        to_disk: Hold the snapshot's tensors in a file in this folder, not in memory.

    Returns:
        The suggestions (or ``None``) and the sweep's Trainer.
    """
    scheduler = ParamScheduler(schedule, None, total_steps=num_it)
    stop = [] if stop_factor is None else [_StopOnDivergence(stop_factor)]
    trainer = make_trainer([scheduler, EmptyEpochGuard(), *stop])
    saved = _Snapshot(module, optimizer, to_disk)
    recorder.reset()
    try:
        fit(trainer, scheduler)
    finally:
        saved.restore(module, optimizer)

    def suggest() -> tuple[SuggestedLRs | None, dict[str, tuple[float, float]]]:
        if not funcs:
            return None, {}
        lrs, losses = recorder.lrs[:, -1], recorder.losses
        n = min(len(lrs), len(losses))
        return make_suggestions(funcs, lrs[:n], losses[:n], skip_start=num_it // 10)

    # Under DDP each rank recorded the loss of its own shard: rank 0's curve decides, for all.
    suggested, points = decide_on_rank_zero(trainer, suggest)
    recorder.lr_find_points = points
    if show_plot and trainer.is_global_zero:
        recorder.plot_lr_find()  # shown inline in a notebook
    return suggested, trainer


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
    starts, ends = sweep_bounds(start_lr, end_lr, learn.n_groups)
    num_it = check_int(num_it, "num_it", 2, what="sweep iterations")
    check_choice(snapshot, "snapshot", ("memory", "disk"))
    if snapshot == "disk":
        check_unsharded(
            learn.module,
            'lr_find(snapshot="disk")',
            'use snapshot="memory" (each rank then holds a copy of its own shard only)',
        )
    funcs = () if suggest_funcs is None else suggestion_funcs(suggest_funcs)
    if learn.runner.trainer_kwargs.get("limit_train_batches") in (0, 0.0):
        raise ValueError(
            "limit_train_batches=0 leaves the sweep no batch to train on; lr_find needs at least "
            "one (drop limit_train_batches, or pass a positive one)."
        )

    def make_trainer(callbacks: list[Callback]) -> pl.Trainer:
        # Not a fit: no epoch table, NaN guard (the sweep's own rule handles a loss that is not
        # finite), user callbacks, checkpoints, logs or validation. The live line counts the
        # sweep's iterations (unless the Learner has enable_progress_bar=False).
        return learn.runner.trainer(
            callbacks,
            standard=False,
            progress_label="lr_find",
            max_steps=num_it,
            max_epochs=-1,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
        )

    suggested, _ = range_test(
        learn.module,
        learn.opt,
        learn.recorder,
        make_trainer,
        lambda trainer, scheduler: learn.runner.fit(trainer, scheduler, log=False),
        sweep_schedule(starts, ends),
        num_it,
        stop_factor=4.0 if stop_div else None,
        funcs=funcs,
        show_plot=show_plot,
        to_disk=learn.path if snapshot == "disk" else None,
    )
    return suggested
