"""Lightning callbacks that guard a fit: a NaN or infinite loss (or gradient) stops it before
the update (`FiniteLossGuard`), and the normalisation layers of frozen groups stay in eval mode
(`FrozenNormEval`, for ``train_bn=False``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from difflr.groups.freezing import frozen_norms_eval
from difflr.optim.param_groups import (
    layer_group_names,
    read_hypers,
)
from difflr.utils.checks import non_finite_names

if TYPE_CHECKING:
    pass

__all__ = [
    "EmptyEpochGuard",
    "FiniteLossGuard",
    "FrozenNormEval",
]


class FiniteLossGuard(Callback):
    """Stop at a NaN or infinite training loss (and, on request, gradient) before that step's
    update, and leave the model as it was before the failing batch.

    The loss is checked between the forward pass and its backward; with ``check_grads`` the
    gradients are checked too, before the optimizer step (a finite loss can have non-finite
    gradients, e.g. ``sqrt`` at 0). The normalisation statistics that the failing batch's forward
    pass moved (BatchNorm's running mean and variance) are put back from a copy taken at the
    batch's start. The error names the optimizer step, the loss and every layer group's LR, and
    says whether the weights are finite: it checks them rather than assume it.

    Under ``precision="16-mixed"`` non-finite gradients are routine: the ``GradScaler`` skips
    that step (no update) and lowers its scale; the step still counts for the schedule, as in
    Lightning's ``global_step``. The guard leaves such steps to the scaler, and stops only when
    the gradients are not finite at a loss scale below 1 (not an overflow: the scaler would skip
    every step from then on) or when the loss itself is not finite.

    The loss is read on the host once per step (a device synchronisation on a GPU); the Learner
    adds this callback unless ``check_finite=False``. Works for any ``LightningModule`` with
    automatic optimisation.

    Args:
        check_grads: Also check every gradient before each optimizer step (one pass over them).
    """

    def __init__(self, check_grads: bool = False) -> None:
        self.check_grads = check_grads
        self._batch_idx = 0
        self._buffers: list[torch.Tensor] = []  # the model's buffers
        self._saved: list[torch.Tensor] = []  # their values at the running batch's start

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # On their final device: the copies are made once per fit and refreshed every batch.
        # All of them: BatchNorm's integer num_batches_tracked counts the failing batch too (and
        # weighs the running statistics with momentum=None).
        self._buffers = list(pl_module.buffers())
        self._saved = [b.detach().clone() for b in self._buffers]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        if self._buffers:
            # One fused copy on the buffers' device, no sync: 14 us for ResNet-18's 40 BatchNorm
            # statistics on a CPU, against 200 us for a clone() each.
            with torch.no_grad():
                torch._foreach_copy_(self._saved, self._buffers)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        finite = bool(torch.isfinite(loss).all())
        if not _all_ranks(trainer, finite):
            if finite:
                what = "the training loss is not finite on another rank"
            else:
                value = loss.detach().float().mean().item() * trainer.accumulate_grad_batches
                what = f"the training loss is {value}"
            self._stop(trainer, pl_module, what)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.check_grads:
            return
        bad = non_finite_names(
            (name, p.grad) for name, p in pl_module.named_parameters() if p.grad is not None
        )
        scale = _loss_scale(trainer)
        # float16 mixed precision: the GradScaler skips a step whose gradients overflow (no
        # update) and lowers its scale, a routine overflow. At a scale below 1 the gradients are
        # not finite even unscaled: that is no overflow, and the scaler would skip every step.
        overflow = scale is not None and scale >= 1.0
        if not _all_ranks(trainer, not bad or overflow):
            where = ", ".join(bad) if bad else "some parameters, on another rank,"
            at = "" if scale is None else f" even at a loss scale of {scale:g}"
            self._stop(trainer, pl_module, f"the gradients of {where} are not finite{at}")

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str) -> None:
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._saved)
        optimizer = trainer.optimizers[0]
        lrs = ", ".join(
            f"{name}={lr:.3g}"
            for name, lr in zip(layer_group_names(optimizer), read_hypers(optimizer)[0])
        )
        poisoned = non_finite_names(pl_module.named_parameters())
        if poisoned:
            state = (
                f"the weights already hold NaN/inf ({', '.join(poisoned)}): an earlier update "
                "made them so (non-finite gradients with a finite loss; check_finite='grads' "
                "stops at those)"
            )
        else:
            state = "the weights are still finite"
        raise FloatingPointError(
            f"{what} at optimizer step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {self._batch_idx}); training stopped before this step's update, so {state}, "
            f"and the normalisation statistics are as before this batch. LRs: {lrs}. Lower the "
            "LR (learn.lr_find() helps), check the data for NaN/inf, or clip gradients "
            "(gradient_clip_val=...)."
        )


def _loss_scale(trainer: pl.Trainer) -> float | None:
    """The loss scale of the GradScaler that Lightning's float16 mixed precision steps through
    (``precision="16-mixed"``), or ``None`` without one (full precision, ``bf16-mixed``)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


def _all_ranks(trainer: pl.Trainer, ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (one all-reduce under several processes): every rank
    stops at the same step, since a rank that stopped alone would leave the others waiting in
    the gradients' collectives."""
    if trainer.world_size == 1:
        return ok
    return trainer.strategy.reduce_boolean_decision(ok, all=True)


class FrozenNormEval(Callback):
    """Keep the normalisation layers whose parameters are frozen in eval mode during training
    (``train_bn=False``): their running statistics stay as they are. See
    `difflr.groups.freezing.frozen_norms_eval`."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen_norms_eval(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen_norms_eval(pl_module)


class EmptyEpochGuard(Callback):
    """Refuse a training loader that yields no batch in an epoch (an empty ``IterableDataset``
    with ``limit_train_batches``): the fit would "finish" having trained nothing, and a sweep
    that repeats epochs until it has made its steps would never end."""

    def __init__(self) -> None:
        self._batches = 0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batches == 0:
            raise ValueError(
                f"the training loader yielded no batch in epoch {trainer.current_epoch}, so "
                "nothing trained; check the dataset (an empty IterableDataset?), its batch_size "
                "and drop_last, and limit_train_batches."
            )
