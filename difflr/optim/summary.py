"""What a Learner's ``summary()`` shows: its layer groups, their trainable state and LR, and the
optimizer that trains them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from difflr.groups.blocks import tied_parameters
from difflr.groups.layers import LayerGroup
from difflr.groups.splitters import describe_group
from difflr.optim.implementation import describe_optimizer

__all__ = ["summary_table"]


def summary_table(
    model: nn.Module,
    splits: Sequence[LayerGroup],
    frozen: Sequence[bool],
    optimizer: torch.optim.Optimizer,
    lr_label: str,
    lrs: Sequence[float],
) -> str:
    """`difflr.Learner.summary`'s table: a row per layer group (name, parameters, trainable state,
    the LR ``lrs`` under ``lr_label``, the modules it holds), a line per tied parameter saying
    which group trains it, and the optimizer with the implementation its step runs."""
    rows = [("group", "params", "trainable", lr_label, "modules")]
    adapters = any(group.fixed for group in splits)  # the base weights of an adapter model
    if adapters:
        rows = [("group", "adapters", "base (frozen)", "trainable", lr_label, "modules")]
    for group, is_frozen, lr in zip(splits, frozen, lrs):
        trainable = sum(p.numel() for p in group.params if p.requires_grad)
        state = (
            "no" if trainable == 0 else ("yes" if not is_frozen else f"norm only ({trainable:,})")
        )
        modules = describe_group(model, group)
        counts: tuple[str, ...] = (f"{group.n_params:,}",)
        if adapters:
            base = sum(p.numel() for p in group.fixed)
            counts = (f"{group.n_params - base:,}", f"{base:,}")
        rows.append((group.name, *counts, state, f"{lr:.2e}", modules))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    owner = {id(p): g.name for g in splits for p in g.params}
    named = dict(model.named_parameters())
    for names in tied_parameters(model):
        where = owner.get(id(named[names[0]]), "no group")
        lines.append(f"tied: {' = '.join(names)} (one tensor, trained in {where})")
    lines.append(
        f"optimizer: {describe_optimizer(optimizer)}, {len(optimizer.param_groups)} param groups"
    )
    return "\n".join(lines)
