"""Batch-like nested structures: a tensor, or tuples, lists and dicts of them.

Outputs, targets and inputs of any shape are moved to the CPU or a device, concatenated batch
after batch, indexed and counted item by item here, for `difflr.predictions` and
`difflr.interpretation` alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "concat",
    "is_container_of_tensors",
    "n_items",
    "take",
    "to_cpu",
    "to_device",
]


# ----------------------------------------------------------------------------- nested outputs
def n_items(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.ndim else 1
    if isinstance(obj, Mapping):
        return n_items(next(iter(obj.values())))
    if isinstance(obj, (tuple, list)) and obj and is_container_of_tensors(obj):
        return n_items(obj[0])
    return len(obj)


def is_container_of_tensors(obj: Sequence[Any]) -> bool:
    return all(isinstance(o, (torch.Tensor, tuple, list, Mapping)) for o in obj)


def to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_cpu(o) for o in obj)
    return obj


def concat(parts: list[Any]) -> Any:
    """Batches → one: tensors concatenated, tuples and dicts element by element, other
    sequences (strings, ids) flattened."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([p.reshape(1) if p.ndim == 0 else p for p in parts])
    if isinstance(first, Mapping):
        return {k: concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)) and first and is_container_of_tensors(first):
        return type(first)(concat([p[i] for p in parts]) for i in range(len(first)))
    return [item for p in parts for item in p]


def take(obj: Any, index: int | slice | np.ndarray) -> Any:
    """Item ``index``, or items ``index`` (a slice or an index array), of a batch-like object."""
    if isinstance(obj, torch.Tensor):
        return obj[torch.as_tensor(index)] if isinstance(index, np.ndarray) else obj[index]
    if isinstance(obj, Mapping):
        return {k: take(v, index) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)) and obj and is_container_of_tensors(obj):
        return type(obj)(take(o, index) for o in obj)
    if isinstance(index, np.ndarray):
        return [obj[i] for i in index]
    return obj[index]


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    return obj
