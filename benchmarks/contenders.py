"""The code a user writes without difflr: a hand-written LightningModule and a plain PyTorch loop.

``opt_kwargs`` selects torch's optimizer implementation (``{}``: torch's default). Comparisons
of framework overhead give every contender the implementation the Learner chose, so that the
optimizer step, a quarter of a ResNet-18 step, is the same work on both sides.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import adamw, fastai_one_cycle

GroupsFn = Callable[[nn.Module], "list[list[nn.Parameter]]"]

#: The Trainer arguments difflr's Learner sets for every fit, given to the hand-written Trainer
#: too so that both run the same loop (no checkpoint, no summary, no sanity validation).
EQUAL_TRAINER_KWARGS: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "enable_progress_bar": False,
    "num_sanity_val_steps": 0,
}


class HandWrittenModule(pl.LightningModule):
    """What a Lightning user writes.

    With ``groups_fn``: discriminative one-cycle, AdamW with two param groups per layer group
    and ``OneCycleLR`` set up as fastai's, stepped every batch. Without: torch's defaults,
    ``AdamW(self.parameters(), lr)`` and ``OneCycleLR(optimizer, lr, total_steps)``.
    ``one_cycle=False`` returns the optimizer alone, for Lightning's ``Tuner.lr_find`` (which
    swaps in its own scheduler).
    """

    def __init__(
        self,
        model: nn.Module,
        lrs: Sequence[float],
        groups_fn: GroupsFn | None = None,
        opt_kwargs: dict[str, Any] | None = None,
        one_cycle: bool = True,
    ) -> None:
        super().__init__()
        self.model, self.lrs, self.groups_fn = model, list(lrs), groups_fn
        self.opt_kwargs, self.one_cycle = opt_kwargs or {}, one_cycle

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("valid_loss", F.cross_entropy(self.model(x), y), prog_bar=True)

    def configure_optimizers(self) -> Any:
        if self.groups_fn is None:
            lr = max(self.lrs)
            optimizer = torch.optim.AdamW(self.parameters(), lr=lr, **self.opt_kwargs)
        else:
            optimizer = adamw(self.groups_fn(self.model), self.lrs, self.opt_kwargs)
        if not self.one_cycle:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        if self.groups_fn is None:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total)
        else:
            scheduler = fastai_one_cycle(optimizer, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def plain_fit(
    model: nn.Module,
    groups_fn: GroupsFn,
    lrs: Sequence[float],
    loaders: tuple[DataLoader, DataLoader | None],
    epochs: int,
    opt_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """A plain PyTorch loop: AdamW + OneCycleLR stepped every batch, a validation pass per epoch
    (eval mode, inference mode) when there is a validation loader. Returns the last validation
    loss and each batch's start in CPU time, per epoch (as ``common.StepTimer`` records them)."""
    train_dl, valid_dl = loaders
    optimizer = adamw(groups_fn(model), lrs, opt_kwargs)
    scheduler = fastai_one_cycle(optimizer, epochs * len(train_dl))
    valid_loss, starts = math.nan, []
    for _ in range(epochs):
        model.train()
        starts.append([])
        for x, y in train_dl:
            starts[-1].append(time.process_time())
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if valid_dl is not None:
            model.eval()
            with torch.inference_mode():
                total = sum(
                    float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in valid_dl
                )
            valid_loss = total / len(valid_dl.dataset)
    return {"valid_loss": valid_loss, "starts": starts}


def plain_sweep(
    model: nn.Module,
    groups_fn: GroupsFn,
    train_dl: DataLoader,
    lr_range: tuple[float, float, int],
    opt_kwargs: dict[str, Any],
) -> None:
    """A plain LR sweep, the floor for an LR finder (no snapshot, no restore, no framework):
    ``num_it`` training steps at ``start * (end/start) ** (i/num_it)`` in every layer group,
    cycling over the loader, reading each loss on the host (as any LR finder must)."""
    start, end, num_it = lr_range
    groups = groups_fn(model)
    optimizer = adamw(groups, [start] * len(groups), opt_kwargs)
    model.train()
    batches = iter(train_dl)
    for i in range(num_it):
        batch = next(batches, None)
        if batch is None:
            batches = iter(train_dl)
            batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = start * (end / start) ** (i / num_it)
        loss = F.cross_entropy(model(batch[0]), batch[1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the host reads every loss, as an LR finder must
