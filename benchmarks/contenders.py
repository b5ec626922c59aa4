"""The code a user writes without difflr: a hand-written LightningModule and a plain PyTorch loop.

Both use the same layer groups, the same AdamW param groups (weight decay on weights only) and
torch's ``OneCycleLR`` set up as fastai's one-cycle (see ``common.adamw_one_cycle``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import adamw_one_cycle, now, torch_param_groups

GroupsFn = Callable[[nn.Module], "list[list[nn.Parameter]]"]

#: The Trainer arguments difflr's Learner sets for every fit, given to the hand-written Trainer
#: too so that both run the same loop (no checkpoint, no summary, no sanity validation).
EQUAL_TRAINER_KWARGS: dict[str, Any] = {
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "enable_progress_bar": False,
    "num_sanity_val_steps": 0,
    "accelerator": "cpu",
    "devices": 1,
}


class HandWrittenModule(pl.LightningModule):
    """What a Lightning user writes for discriminative one-cycle: AdamW with a param group per
    layer group and ``OneCycleLR`` stepped every batch (``one_cycle=False``: a constant LR, for
    Lightning's ``Tuner.lr_find``, which swaps in its own scheduler)."""

    def __init__(
        self,
        model: nn.Module,
        groups_fn: GroupsFn,
        lrs: Sequence[float],
        one_cycle: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.groups_fn = groups_fn
        self.lrs = list(lrs)
        self.one_cycle = one_cycle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("valid_loss", loss, prog_bar=True)

    def configure_optimizers(self) -> Any:
        groups = self.groups_fn(self.model)
        if not self.one_cycle:
            param_groups, group_lrs = torch_param_groups(groups, self.lrs)
            return torch.optim.AdamW(param_groups, lr=group_lrs[-1])
        total = int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = adamw_one_cycle(groups, self.lrs, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def plain_fit(
    model: nn.Module,
    groups_fn: GroupsFn,
    lrs: Sequence[float],
    train_dl: DataLoader,
    valid_dl: DataLoader | None,
    epochs: int,
    starts: list[list[tuple[float, float]]] | None = None,
) -> dict[str, float]:
    """A plain PyTorch loop: AdamW + OneCycleLR stepped every batch, a validation pass per epoch
    (eval mode, inference mode) when ``valid_dl`` is given. ``starts`` collects each batch's
    start time per epoch, on both clocks (as ``common.StepTimer`` does)."""
    optimizer, scheduler = adamw_one_cycle(groups_fn(model), lrs, epochs * len(train_dl))
    valid_loss = math.nan
    loss = torch.tensor(math.nan)
    for _ in range(epochs):
        model.train()
        epoch_starts: list[tuple[float, float]] = []
        for x, y in train_dl:
            epoch_starts.append(now())
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if starts is not None:
            starts.append(epoch_starts)
        if valid_dl is not None:
            model.eval()
            total, count = 0.0, 0
            with torch.inference_mode():
                for x, y in valid_dl:
                    total += float(F.cross_entropy(model(x), y, reduction="sum"))
                    count += len(y)
            valid_loss = total / count
    return {"train_loss": loss.item(), "valid_loss": valid_loss}


def plain_sweep(
    model: nn.Module,
    groups_fn: GroupsFn,
    train_dl: DataLoader,
    num_it: int,
    start_lr: float,
    end_lr: float,
) -> dict[str, Any]:
    """A plain LR sweep: ``num_it`` training steps at ``start * (end/start) ** (i/num_it)``,
    every layer group, cycling over the loader, reading each loss on the host (as any LR finder
    must). The floor for an LR finder: no snapshot, no restore, no framework."""
    param_groups, _ = torch_param_groups(groups_fn(model), [start_lr] * len(groups_fn(model)))
    optimizer = torch.optim.AdamW(param_groups, lr=start_lr)
    model.train()
    losses: list[float] = []
    batches = iter(train_dl)
    for i in range(num_it):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(train_dl)
            x, y = next(batches)
        lr = start_lr * (end_lr / start_lr) ** (i / num_it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"iterations": len(losses)}
