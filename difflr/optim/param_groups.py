"""Optimizer param groups over layer groups, and each layer group's hyper-parameters on them.

Each layer group becomes one or two torch param groups of the same optimizer: one for the
parameters that take weight decay and, while ``wd_bn_bias=False``, one for the biases and the
normalisation-layer parameters, which take none. Both carry the layer group's name and index
(``"layer_group"``), so one LR and one momentum per layer group drive them together. The
helpers read and write those per-layer-group values on any optimizer built this way (and treat
an optimizer without the index key as one layer group per param group)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from difflr.groups.layers import LayerGroup, no_decay_param_ids

__all__ = [
    "GROUP_INDEX_KEY",
    "build_param_groups",
    "layer_group_index",
    "layer_group_names",
    "momentum_key",
    "read_hypers",
    "set_weight_decay",
    "write_hypers",
]

#: Param-group key holding the layer group's index; torch ignores keys it does not know.
GROUP_INDEX_KEY = "layer_group"


def build_param_groups(
    model: nn.Module, groups: Sequence[LayerGroup], wd_bn_bias: bool = False
) -> list[dict[str, Any]]:
    """Torch param groups for ``groups``: one or two per layer group, each named and indexed.

    With ``wd_bn_bias=False`` a layer group's biases and normalisation params go into a second
    param group named ``"{name}/no_decay"`` whose weight decay is always 0.
    """
    no_decay = no_decay_param_ids(model) if not wd_bn_bias else set()
    param_groups = []
    for index, group in enumerate(groups):
        decay = [p for p in group.params if id(p) not in no_decay]
        plain = [p for p in group.params if id(p) in no_decay]
        if decay:
            param_groups.append({"params": decay, "name": group.name, GROUP_INDEX_KEY: index})
        if plain:
            param_groups.append(
                {
                    "params": plain,
                    "name": f"{group.name}/no_decay" if decay else group.name,
                    GROUP_INDEX_KEY: index,
                    "no_decay": True,
                }
            )
    return param_groups


def momentum_key(optimizer: torch.optim.Optimizer) -> str | None:
    """The hyper-parameter the one-cycle momentum drives: ``"betas"`` (Adam, AdamW, ...; its
    first coefficient), ``"momentum"`` (SGD, RMSprop) or ``None``."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return "betas"
    if "momentum" in group:
        return "momentum"
    return None


def layer_group_index(optimizer: torch.optim.Optimizer) -> list[int]:
    """For each torch param group, the index of the layer group it belongs to."""
    return [pg.get(GROUP_INDEX_KEY, i) for i, pg in enumerate(optimizer.param_groups)]


def layer_group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """One name per layer group: the ``"name"`` of its first torch param group."""
    names: dict[int, str] = {}
    for i, (index, pg) in enumerate(zip(layer_group_index(optimizer), optimizer.param_groups)):
        names.setdefault(index, str(pg.get("name", f"group{i}")).split("/")[0])
    return [names[i] for i in sorted(names)]


def read_hypers(
    optimizer: torch.optim.Optimizer, index: Sequence[int] | None = None, key: str | None = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Each layer group's current LR and momentum (NaN where the optimizer has no momentum).

    ``index`` and ``key`` may be passed pre-computed (the recorder does, once per fit).
    """
    index = layer_group_index(optimizer) if index is None else index
    key = momentum_key(optimizer) if key == "" else key
    n = max(index) + 1
    lrs = np.full(n, np.nan)
    moms = np.full(n, np.nan)
    for i, pg in zip(index, optimizer.param_groups):
        if np.isnan(lrs[i]):
            lrs[i] = pg["lr"]
            if key is not None:
                moms[i] = pg[key][0] if key == "betas" else pg[key]
    return lrs, moms


def write_hypers(
    optimizer: torch.optim.Optimizer,
    lrs: np.ndarray,
    moms: np.ndarray | None,
    index: Sequence[int] | None = None,
    key: str | None = None,
) -> None:
    """Set every torch param group's LR (and momentum) from its layer group's value.

    ``index`` and ``key`` may be passed pre-computed (the scheduler does, once per fit) so that a
    step does only O(param groups) Python work.
    """
    index = layer_group_index(optimizer) if index is None else index
    for i, pg in zip(index, optimizer.param_groups):
        pg["lr"] = float(lrs[i])
        if moms is not None and key is not None:
            if key == "betas":
                pg["betas"] = (float(moms[i]), pg["betas"][1])
            else:
                pg["momentum"] = float(moms[i])


def set_weight_decay(optimizer: torch.optim.Optimizer, wd: float | None) -> None:
    """Set ``wd`` on the decayed param groups (``None``: leave them); no-decay groups stay at 0."""
    for pg in optimizer.param_groups:
        if pg.get("no_decay"):
            if "weight_decay" in pg:
                pg["weight_decay"] = 0.0
        elif wd is not None:
            pg["weight_decay"] = wd
