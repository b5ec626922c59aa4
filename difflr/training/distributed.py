"""Multi-process training (DDP): one decision for all ranks, identical replicas after each fit.

A Learner builds a fresh ``Trainer`` per fit and freezes before it, so DDP wraps exactly the
params that train in that fit. What is left for difflr to do under DDP is small, and lives here:

- `decide_on_rank_zero`: a decision taken from data that differs between ranks (the LR
  finder's loss curve is rank 0's shard) is made on global rank 0 and sent to every rank.
- `SyncBuffers`: at the end of a fit every rank takes rank 0's buffers (BatchNorm running
  statistics are updated from each rank's own batches; DDP only re-synchronises them at the next
  forward), so that every replica ends a fit bit-identical to rank 0, whose model is checkpointed.
- The launchers that run each call in worker processes (``ddp_notebook``/``ddp_fork``) are
  `difflr.training.handback`'s: the workers hand back everything a Learner keeps.
- `planned_world_size` and `batches_per_process`: the number of optimizer steps a
  fit will make in each process, for schedule previews (the sampler shards the data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

T = TypeVar("T")

__all__ = [
    "SyncBuffers",
    "batches_per_process",
    "decide_on_rank_zero",
    "is_distributed",
    "planned_world_size",
]

#: The Trainer arguments that decide how many processes train.
_PROCESS_ARGS = ("accelerator", "strategy", "devices", "num_nodes", "plugins")


def is_distributed(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` runs in several processes that can talk now (a live process group)."""
    return (
        trainer.world_size > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def decide_on_rank_zero(trainer: pl.Trainer, decide: Callable[[], T]) -> T:
    """Call ``decide()`` on global rank 0 only and return its result on every rank.

    Works after ``trainer.fit`` has returned (Lightning's script launcher keeps the process group
    until the program ends). In one process it simply returns ``decide()``. If ``decide`` raises
    on rank 0, rank 0 raises that error and every other rank a ``RuntimeError`` with its message,
    so no rank waits for a result that will not come.

    Args:
        trainer: The Trainer whose strategy connects the ranks.
        decide: Computes the result (which must pickle) from rank 0's data.

    Raises:
        RuntimeError: On ranks other than 0, when ``decide`` raised on rank 0.
    """
    if not is_distributed(trainer):
        return decide()
    result, error = None, None
    if trainer.is_global_zero:
        try:
            result = decide()
        except Exception as exc:
            error = exc
    message = None if error is None else f"{type(error).__name__}: {error}"
    result, message = trainer.strategy.broadcast((result, message), src=0)
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed, so rank {trainer.global_rank} stops too: {message}")
    return result


class SyncBuffers(Callback):
    """At the end of each fit, copy global rank 0's buffers to every other rank.

    Under DDP the gradients, hence the parameters, are identical on every rank, but buffers that
    the forward pass updates (BatchNorm's ``running_mean``, ``running_var``) follow each rank's own
    batches; DDP broadcasts them from rank 0 only at the start of the next forward. Without a
    validation loop after the last training step the ranks would end the fit with different
    statistics. One broadcast per buffer per fit; nothing happens in a single process.

    Examples:
        >>> trainer = pl.Trainer(strategy="ddp", devices=2, callbacks=[SyncBuffers()])  # doctest: +SKIP
    """

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_distributed(trainer):
            return
        with torch.no_grad():
            for buffer in pl_module.buffers():
                torch.distributed.broadcast(buffer, src=0)


def planned_world_size(trainer_kwargs: Mapping[str, Any]) -> int:
    """The number of processes a ``Trainer(**trainer_kwargs)`` would train in, without training.

    Asks a Trainer built with only the arguments that decide it (``accelerator``, ``strategy``,
    ``devices``, ``num_nodes``, ``plugins``), so that Lightning's own rules apply (``"auto"``
    devices, ``num_nodes``); building one starts no process.
    """
    kwargs = {k: trainer_kwargs[k] for k in _PROCESS_ARGS if k in trainer_kwargs}
    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    return trainer.world_size


def batches_per_process(loader: Any, world_size: int, use_distributed_sampler: bool = True) -> int:
    """How many batches of ``loader`` each of ``world_size`` processes gets in an epoch.

    Lightning gives a ``DataLoader`` over a sized dataset a ``DistributedSampler`` (unless
    ``use_distributed_sampler=False`` or the loader has one already), which hands each process
    ``ceil(len(dataset) / world_size)`` samples, then batched with the loader's ``batch_size``
    and ``drop_last``.

    Args:
        loader: The training loader (it must have a length).
        world_size: Number of processes (>= 1).
        use_distributed_sampler: The Trainer argument of the same name.

    Examples:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(100, 1)), batch_size=16)
        >>> len(loader), batches_per_process(loader, 2), batches_per_process(loader, 4)
        (7, 4, 2)
    """
    n = len(loader)
    if world_size <= 1 or not use_distributed_sampler:
        return n
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        return n  # already sharded by the user
    batch_size = getattr(loader, "batch_size", None)
    dataset = getattr(loader, "dataset", None)
    if not batch_size or isinstance(dataset, torch.utils.data.IterableDataset):
        return math.ceil(n / world_size)
    try:
        per_process = math.ceil(len(dataset) / world_size)
    except TypeError:
        return math.ceil(n / world_size)
    if getattr(loader, "drop_last", False):
        return per_process // batch_size
    return math.ceil(per_process / batch_size)
