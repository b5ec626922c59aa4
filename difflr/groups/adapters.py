"""Adapters (LoRA and the other ``peft`` methods): which parameters train, and LoRA+.

Installed with ``pip install difflr[peft]``; nothing here imports ``peft``. A model can only hold
``peft`` adapters if the user has imported ``peft`` already, so the check looks in
``sys.modules`` (as `difflr.groups.hf` does for transformers) and ``import difflr`` stays free of
it. The model is recognised by its adapter layers (``peft``'s ``BaseTunerLayer``), so a
``PeftModel`` (``get_peft_model``) and a model whose layers were given adapters in place
(``inject_adapter_in_model``, transformers' ``add_adapter``) are treated alike.

**Layer groups.** An adapter model is split like its base model (a Hugging Face model gets
``embeddings``, ``layer0`` .. ``layer{n-1}``, ``head``), each group holding its block's base
weights *and* its adapters. The base weights that the adapter method froze are the group's
`LayerGroup.fixed` parameters: no freeze pattern trains them (`difflr.groups.freezing`), the
optimizer does not hold them (`difflr.optim.param_groups`), and ``save`` leaves them out. So
``unfreeze()`` trains every adapter and the head that ``peft`` trains (``modules_to_save``), and
``freeze_to(n)`` freezes the adapters of the groups below ``n``.

The parameters that train are ``peft``'s trainable set: those that require grad when the Learner
is made, plus the adapters of the active adapter(s) even if they were frozen by hand before.

**LoRA+** (Hayou, Ghosh and Yu, 2024): the B matrices train at ``ratio`` times the LR of the A
matrices. `lora_plus_scales` says, per parameter, by how much its layer group's LR is multiplied,
with ``peft``'s rule (``peft.optimizers.create_loraplus_optimizer``): every ``lora_B`` matrix and
every one-dimensional trainable parameter (biases, norm weights, DoRA magnitudes) get ``ratio``;
the rest get 1. One difference: ``peft`` gives the adapters of an embedding layer a fixed LR
(``loraplus_lr_embedding``, 1e-6 by default) that no schedule moves; here they get their group's
LR (a multiplier of 1), so that they follow the one-cycle schedule and the LR finder like the rest.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from difflr.groups.layers import LayerGroup

__all__ = [
    "AdapterWeights",
    "adapter_layers",
    "check_lora_plus_ratio",
    "has_adapters",
    "lora_plus_scales",
    "mark_fixed",
    "merged_copy",
    "saved_part",
    "tunable_param_ids",
]

#: What to install for adapter support, for messages.
EXTRA = 'pip install "difflr[peft]"'


def _tuner_layer_class() -> type | None:
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    cls = getattr(tuners, "BaseTunerLayer", None) if tuners else None
    return cls if isinstance(cls, type) else None


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every ``peft`` adapter layer in ``model`` (its ``BaseTunerLayer``
    modules: a ``lora.Linear``, ``lora.Embedding``, ...), without importing ``peft``.

    Examples:
        >>> from torch import nn
        >>> adapter_layers(nn.Linear(2, 2))
        []
    """
    cls = _tuner_layer_class()
    if cls is None:
        return []
    return [(path, module) for path, module in model.named_modules() if isinstance(module, cls)]


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds ``peft`` adapter layers (a ``PeftModel``, or a model given
    adapters in place).

    Examples:
        >>> from torch import nn
        >>> has_adapters(nn.Linear(2, 2))
        False
    """
    return bool(adapter_layers(model))


def _active(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if isinstance(active, str):
        return [active]
    return list(active) if isinstance(active, (list, tuple)) else []


def _active_adapter_params(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of the active adapters: those of each adapter layer's per-adapter dicts
    (``lora_A``, ``lora_B``, ``lora_embedding_A``, ...), and the trained copies of the modules
    ``peft`` saves (``modules_to_save``)."""
    for _, layer in adapter_layers(model):
        for name in getattr(layer, "adapter_layer_names", ()):
            holder = getattr(layer, name, None)
            if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)):
                for adapter in _active(layer):
                    if adapter in holder:
                        item = holder[adapter]
                        yield from [item] if isinstance(item, nn.Parameter) else item.parameters()
    for module in model.modules():
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict) and hasattr(module, "original_module"):
            for adapter in _active(module):
                if adapter in copies:
                    yield from copies[adapter].parameters()


def tunable_param_ids(model: nn.Module) -> set[int] | None:
    """Ids of the parameters of an adapter model that may train: those that require grad now
    (``peft``'s trainable set) and those of the active adapters; ``None`` for a model without
    adapters (every parameter may train)."""
    if not has_adapters(model):
        return None
    ids = {id(p) for p in model.parameters() if p.requires_grad}
    ids.update(id(p) for p in _active_adapter_params(model))
    return ids


def mark_fixed(model: nn.Module, groups: Sequence[LayerGroup]) -> list[LayerGroup]:
    """``groups`` with each group's base weights, those an adapter method froze, as its
    `LayerGroup.fixed` parameters; ``groups`` unchanged for a model without adapters.

    A group may hold base weights only (the embeddings, when no adapter targets them): it stays,
    so that an LR spec covers the same groups as for the base model, and simply never trains.
    """
    tunable = tunable_param_ids(model)
    if tunable is None:
        return list(groups)
    return [
        LayerGroup(g.name, g.params, tuple(p for p in g.params if id(p) not in tunable))
        for g in groups
    ]


# ------------------------------------------------------------------------------------------------
# LoRA+
# ------------------------------------------------------------------------------------------------


def check_lora_plus_ratio(ratio: Any) -> float | None:
    """``ratio`` as a float, or ``None`` (LoRA+ off).

    Raises:
        TypeError: ``ratio`` is not a number.
        ValueError: ``ratio`` is not finite or not above 0.

    Examples:
        >>> check_lora_plus_ratio(16)
        16.0
    """
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(
            f"lora_plus_ratio must be a number (the B matrices' LR over the A matrices', 16 in "
            f"the LoRA+ paper) or None, got {ratio!r}."
        )
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(
            f"lora_plus_ratio={ratio!r}: it must be finite and above 0 (the B matrices train at "
            "ratio x their group's LR; LoRA+ uses 16). Pass None to turn LoRA+ off."
        )
    return float(ratio)


def lora_plus_scales(
    model: nn.Module, groups: Sequence[LayerGroup], ratio: float
) -> dict[int, float]:
    """Per parameter id, the multiplier of its layer group's LR under LoRA+: ``ratio`` for
    every ``lora_B`` matrix and every one-dimensional parameter that trains, as in ``peft``'s
    ``create_loraplus_optimizer``; parameters left out take their group's LR. The adapters of an
    embedding layer (``lora_embedding_A``/``_B``) take their group's LR (``peft`` pins them at an
    LR of their own, which no schedule moves).

    Raises:
        ValueError: The model holds no LoRA B matrix (no adapters, or another method than LoRA).
        ModuleNotFoundError: ``peft`` is not installed (the message says which extra to install).
    """
    if _tuner_layer_class() is None and importlib.util.find_spec("peft") is None:
        raise ModuleNotFoundError(
            f"lora_plus_ratio={ratio:g} needs a model with LoRA adapters made by peft, and peft "
            f"is not installed: {EXTRA}, then wrap the model with peft's "
            "get_peft_model(model, LoraConfig(...)). Pass lora_plus_ratio=None to train without "
            "LoRA+."
        )
    fixed = {id(p) for g in groups for p in g.fixed}
    names = {id(p): name for name, p in model.named_parameters()}
    embedding_ids = {
        id(p)
        for _, layer in adapter_layers(model)
        for name in ("lora_embedding_A", "lora_embedding_B")
        if isinstance(getattr(layer, name, None), nn.Module)
        for p in getattr(layer, name).parameters()
    }
    scales: dict[int, float] = {}
    n_b = 0
    for group in groups:
        for p in group.params:
            if id(p) in fixed or id(p) in embedding_ids:
                continue
            if "lora_B" in names.get(id(p), ""):
                n_b += 1
                scales[id(p)] = ratio
            elif p.ndim == 1:
                scales[id(p)] = ratio
    if n_b == 0:
        raise ValueError(
            f"lora_plus_ratio={ratio:g} needs LoRA B matrices (lora_B), but "
            f"{type(model).__name__} has none"
            + (" (its adapters are of another method)" if has_adapters(model) else "")
            + ". Wrap it with peft's get_peft_model(model, LoraConfig(...)), or pass "
            "lora_plus_ratio=None."
        )
    return scales


# ------------------------------------------------------------------------------------------------
# Saving the adapters, exporting the merged model
# ------------------------------------------------------------------------------------------------


class AdapterWeights:
    """The part of an adapter model that `Learner.save` writes and `Learner.load` reads: the
    state-dict entries of the parameters that train (adapters, ``modules_to_save``) and the
    buffers of modules made only of them; the base weights are left out.

    It offers the two methods `difflr.utils.files` calls on a model: ``state_dict()`` (the
    subset, under the model's own keys) and ``load_state_dict(state, strict)``, which loads into
    the model and leaves the base weights as they are.

    Args:
        model: The adapter model.
        groups: Its layer groups (their `LayerGroup.fixed` parameters are left out).
    """

    def __init__(self, model: nn.Module, groups: Sequence[LayerGroup]) -> None:
        self.model = model
        fixed = {id(p) for g in groups for p in g.fixed}
        own: dict[str, Any] = model.state_dict(keep_vars=True)
        params = {id(p) for p in model.parameters()}
        modules = dict(model.named_modules())
        keys = []
        for key, value in own.items():
            if id(value) in params:
                if id(value) not in fixed:
                    keys.append(key)
                continue
            owner = modules.get(key.rpartition(".")[0])
            mine = list(owner.parameters()) if owner is not None else []
            if mine and all(id(p) not in fixed for p in mine):
                keys.append(key)  # a buffer of a trained module (a BatchNorm in a saved head)
        self.keys = keys

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters' entries of ``model.state_dict()``."""
        own = self.model.state_dict()
        return {key: own[key] for key in self.keys}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> Any:
        """Load ``state`` (checked against `state_dict` by the caller) into the model."""
        if strict:
            missing = [k for k in self.keys if k not in state]
            unexpected = [k for k in state if k not in self.keys]
            if missing or unexpected:
                raise ValueError(
                    f"the adapter state does not fit: missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]}; pass strict=False to load the entries both have."
                )
        wanted = {k: v for k, v in state.items() if k in self.keys}
        return self.model.load_state_dict(wanted, strict=False)


def saved_part(model: nn.Module, groups: Sequence[LayerGroup]) -> Any:
    """What ``save`` writes of ``model``: its adapters (`AdapterWeights`) for a model whose
    groups hold fixed base weights, else the model itself."""
    if any(g.fixed for g in groups):
        return AdapterWeights(model, groups)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapters merged into the base weights and the ``peft``
    wrappers gone (``merge_and_unload``), for inference; ``model`` is left untouched.

    A ``PeftModel`` (also one held inside another module) becomes its base model; adapter layers
    added in place are replaced by their base layers with the adapters merged in, and
    ``modules_to_save`` wrappers by their trained copies. The copy needs as much memory as
    ``model``.

    Raises:
        ValueError: ``model`` holds no adapters.
    """
    if not has_adapters(model):
        raise ValueError(
            f"{type(model).__name__} holds no peft adapters, so there is nothing to merge; "
            "export it with merge_adapters=False (or None)."
        )
    merged = copy.deepcopy(model)
    if _unloads(merged):
        return merged.merge_and_unload()  # type: ignore[operator]
    unloaded: list[str] = []
    for path, module in list(merged.named_modules()):
        if any(path.startswith(f"{done}.") for done in unloaded):
            continue  # inside a PeftModel already unloaded (its tuner model unloads too)
        if path and _unloads(module):
            _replace(merged, path, module.merge_and_unload())  # type: ignore[operator]
            unloaded.append(path)
    for path, layer in reversed(adapter_layers(merged)):  # children before their parents
        layer.merge()  # type: ignore[operator]
        _replace(merged, path, layer.get_base_layer())  # type: ignore[operator]
    for path, module in list(merged.named_modules()):
        copies = getattr(module, "modules_to_save", None)
        if path and isinstance(copies, nn.ModuleDict) and hasattr(module, "original_module"):
            active = _active(module)
            chosen = copies[active[0]] if active and active[0] in copies else module.original_module
            _replace(merged, path, chosen)
    return merged


def _unloads(module: nn.Module) -> bool:
    """A ``PeftModel`` (it has ``merge_and_unload`` and a ``peft_config``)."""
    return callable(getattr(module, "merge_and_unload", None)) and hasattr(module, "peft_config")


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)
