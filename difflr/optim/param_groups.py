"""Optimizer param groups over layer groups, and each layer group's hyper-parameters on them.

Each layer group becomes one or two torch param groups of the same optimizer: one for the
parameters that take weight decay and, while ``wd_bn_bias=False``, one for the biases and the
normalisation-layer parameters, which take none. Both carry the layer group's name and index
(``"layer_group"``), so one LR and one momentum per layer group drive them together. With LoRA+
the B matrices of a layer group go into param groups of their own that run at a multiple of the
group's LR (the ``"lr_scale"`` key). The helpers at the end of this module read and write those
per-layer-group values on any optimizer built this way (and treat an optimizer without the index
key as one layer group per param group)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
#: Param-group key holding the multiplier of the layer group's LR (LoRA+'s B matrices); a param
#: group without it runs at its layer group's LR.
LR_SCALE_KEY = "lr_scale"


def build_param_groups(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    wd_bn_bias: bool = False,
    lr_scales: Mapping[int, float] | None = None,
) -> list[dict[str, Any]]:
    """Torch param groups for ``groups``: one or more per layer group, each named and indexed.

    With ``wd_bn_bias=False`` a layer group's biases and normalisation params go into a second
    param group named ``"{name}/no_decay"`` whose weight decay is always 0. A group's ``fixed``
    parameters (the base weights of an adapter model) are left out: they never train, so the
    optimizer need not hold them (a layer group made only of them gets an empty param group,
    which keeps its index and LR).

    Args:
        model: The model the groups were cut from.
        groups: Its layer groups.
        wd_bn_bias: Decay biases and normalisation params too.
        lr_scales: Per parameter id, a multiplier of its layer group's LR (LoRA+: the B
            matrices'). The parameters with a multiplier ``r`` other than 1 go into param groups
            of their own, ``"{name}/lr_x{r}"`` (and ``"{name}/lr_x{r}/no_decay"``), that carry it
            under ``"lr_scale"``: `write_hypers` sets their LR to ``r`` times the group's, and
            `read_hypers` reads the group's LR back, so the schedule, the LR finder, the recorder
            and the previews all speak of the layer group's LR.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> groups = [LayerGroup("0.body", tuple(model[0].parameters())),
        ...           LayerGroup("1.head", tuple(model[1].parameters()))]
        >>> scales = {id(model[1].weight): 16.0}
        >>> [(pg["name"], pg.get("lr_scale", 1.0))
        ...  for pg in build_param_groups(model, groups, lr_scales=scales)]
        [('0.body', 1.0), ('0.body/no_decay', 1.0), ('1.head', 1.0), ('1.head/lr_x16', 16.0)]
    """
    no_decay = no_decay_param_ids(model) if not wd_bn_bias else set()
    scales = lr_scales or {}
    param_groups: list[dict[str, Any]] = []
    for index, group in enumerate(groups):
        params = group.tunable
        found = []
        for scale in sorted({float(scales.get(id(p), 1.0)) for p in params}, key=lambda r: r != 1):
            share = [p for p in params if float(scales.get(id(p), 1.0)) == scale]
            name = group.name if scale == 1.0 else f"{group.name}/lr_x{scale:g}"
            extra = {} if scale == 1.0 else {LR_SCALE_KEY: scale}
            decay = [p for p in share if id(p) not in no_decay]
            plain = [p for p in share if id(p) in no_decay]
            if decay:
                found.append({"params": decay, "name": name, GROUP_INDEX_KEY: index, **extra})
            if plain:
                found.append(
                    {
                        "params": plain,
                        "name": f"{name}/no_decay" if decay else name,
                        GROUP_INDEX_KEY: index,
                        "no_decay": True,
                        **extra,
                    }
                )
        if not found:  # only fixed parameters: an empty param group keeps the group's place
            found.append({"params": [], "name": group.name, GROUP_INDEX_KEY: index})
        param_groups.extend(found)
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

    The LR is the layer group's, not a multiplied one (a param group with an ``"lr_scale"``
    runs at that multiple of it).

    ``index`` and ``key`` may be passed pre-computed (the recorder does, once per fit).
    """
    index = layer_group_index(optimizer) if index is None else index
    key = momentum_key(optimizer) if key == "" else key
    n = max(index) + 1
    lrs = np.full(n, np.nan)
    moms = np.full(n, np.nan)
    scaled = np.zeros(n, dtype=bool)  # read from a param group with an LR multiplier
    for i, pg in zip(index, optimizer.param_groups):
        scale = pg.get(LR_SCALE_KEY)
        if np.isnan(lrs[i]) or (scaled[i] and scale is None):
            # A param group without a multiplier gives the group's LR exactly; one with a
            # multiplier only when the group has no other.
            lrs[i] = pg["lr"] if scale is None else pg["lr"] / scale
            scaled[i] = scale is not None
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
    """Set every torch param group's LR (and momentum) from its layer group's value, times the
    param group's ``"lr_scale"`` where it has one (LoRA+).

    ``index`` and ``key`` may be passed pre-computed (the scheduler does, once per fit) so that a
    step does only O(param groups) Python work.
    """
    index = layer_group_index(optimizer) if index is None else index
    for i, pg in zip(index, optimizer.param_groups):
        pg["lr"] = float(lrs[i]) * pg.get(LR_SCALE_KEY, 1.0)
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
