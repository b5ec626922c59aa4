"""The loss of each optimizer step, read once for every difflr callback.

``training_step`` returns a loss (a tensor, or a dict holding it under ``"loss"``), and Lightning
hands it to ``on_train_batch_end`` divided by ``accumulate_grad_batches``. `StepLosses` turns those
batch losses into one loss per optimizer step (the mean of its micro-batches) and smooths it with
`SmoothedLoss`. The recorder's curve, the live progress line and ``lr_find``'s divergence stop all
read it, so they show and test the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["SMOOTH_BETA", "SmoothedLoss", "StepLosses", "batch_loss"]

#: fastai's smoothing factor for the training loss.
SMOOTH_BETA = 0.98


class SmoothedLoss:
    """fastai's debiased exponential moving average of a loss.

    ``avg = beta*avg + (1-beta)*loss``, reported as ``avg / (1 - beta**count)``.

    Examples:
        >>> ema = SmoothedLoss()
        >>> ema.update(2.0), round(ema.update(1.0), 4)
        (2.0, 1.4949)
    """

    def __init__(self, beta: float = SMOOTH_BETA, avg: float = 0.0, count: int = 0) -> None:
        self.beta, self.avg, self.count = beta, avg, count

    def update(self, loss: float) -> float:
        """Add one loss; return the smoothed value."""
        self.avg = self.beta * self.avg + (1 - self.beta) * float(loss)
        self.count += 1
        return self.avg / (1 - self.beta**self.count)


def batch_loss(outputs: Any, accumulate: int = 1) -> torch.Tensor | None:
    """The loss of one training batch, from what ``on_train_batch_end`` receives.

    Args:
        outputs: ``training_step``'s output as Lightning hands it over: a tensor, or a dict with
            the loss under ``"loss"``.
        accumulate: The Trainer's ``accumulate_grad_batches``: Lightning divides the loss by it,
            and this undoes that.

    Returns:
        A 0-d tensor, detached, on its device (reading it is left to the caller, so that no step
        waits for the device); ``None`` for a batch without a loss (``training_step`` returned
        ``None``: Lightning skips the batch) or whose loss is not one number. A tensor with one
        value of any shape is one number (``(1,)`` included: ``backward`` takes it).

    Examples:
        >>> batch_loss({"loss": torch.tensor([0.5])}, accumulate=2)
        tensor(1.)
        >>> batch_loss(None) is None
        True
    """
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        return None
    return loss.detach().reshape(()) * accumulate


class StepLosses:
    """Batch losses in, one smoothed loss per optimizer step out.

    Call `step` from ``on_before_optimizer_step`` and `batch_end` from ``on_train_batch_end``. A
    batch's loss belongs to the step taken during that batch or, under gradient accumulation,
    to the next one taken. The losses stay on their device until `read`, which brings all that
    have a step to the host at once (one synchronisation, however many steps).

    Args:
        ema: The average to continue (a resumed run's); ``None``: a new one.
        last: The smoothed loss of the last step that had one (NaN: none yet).

    Attributes:
        ema: The `SmoothedLoss` every step's loss goes into.
        last: The smoothed loss of the last step read that had a loss (NaN: none yet).

    Examples:
        >>> losses = StepLosses()
        >>> losses.batch_end(torch.tensor(2.0))  # a micro-batch: its step is still to come
        >>> losses.step(); losses.batch_end(torch.tensor(1.0))  # the next batch takes it
        >>> losses.read()
        [1.5]
    """

    def __init__(self, ema: SmoothedLoss | None = None, last: float = math.nan) -> None:
        self.ema = SmoothedLoss() if ema is None else ema
        self.last = last
        self._pending: list[torch.Tensor] = []  # batch losses, on their device
        self._owner: list[int] = []  # the step each of them belongs to
        self._steps = 0  # optimizer steps taken
        self._read = 0  # steps handed out by read()
        self._in_batch = 0  # steps taken during the running batch

    def step(self) -> None:
        """An optimizer step is being taken (``on_before_optimizer_step``)."""
        self._steps += 1
        self._in_batch += 1

    def batch_end(self, outputs: Any, accumulate: int = 1) -> None:
        """A training batch ended with ``outputs`` (``on_train_batch_end``; see `batch_loss`)."""
        loss = batch_loss(outputs, accumulate)
        if loss is not None:
            self._pending.append(loss)
            self._owner.append(self._steps - 1 if self._in_batch else self._steps)
        self._in_batch = 0

    def read(self) -> list[float | None]:
        """The smoothed loss of every step taken since the last read, in order.

        A step none of whose batches had a loss gives ``None`` and leaves the average alone.
        Losses of a step not taken yet (gradient accumulation) wait for it; a loss that comes
        after its step was read (a read between a step and its batch's end) is dropped.
        """
        first, n_new = self._read, self._steps - self._read
        if n_new <= 0:
            return []
        owner = np.array(self._owner, dtype=np.int64)
        ready = owner < self._steps
        losses: np.ndarray = np.empty(0)
        if ready.any():
            losses = _to_host([loss for loss, r in zip(self._pending, ready) if r])
        kept = ready & (owner >= first)
        slot = owner[ready] - first
        losses, slot = losses[kept[ready]], slot[kept[ready]]
        self._pending = [loss for loss, r in zip(self._pending, ready) if not r]
        self._owner = owner[~ready].tolist()
        self._read = self._steps
        counts = np.bincount(slot, minlength=n_new)
        sums = np.bincount(slot, losses, minlength=n_new)
        smoothed: list[float | None] = []
        for total, count in zip(sums, counts):
            if count:
                self.last = self.ema.update(total / count)
                smoothed.append(self.last)
            else:
                smoothed.append(None)
        return smoothed


def _to_host(losses: list[torch.Tensor]) -> np.ndarray:
    """0-d losses from the device, in one transfer (one synchronisation), as float64."""
    return torch.stack(losses).float().cpu().numpy().astype(np.float64)
