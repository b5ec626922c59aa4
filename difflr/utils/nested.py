"""After a fit: the loss and metrics on a dataset, every item's prediction, one prediction.

What a fastai user types after ``fine_tune``; the Learner's methods of the same names delegate
here, through the Learner's public seam to Lightning (``learn.runner``):

- `validate`: Lightning's ``Trainer.validate`` on a fresh Trainer; the loss and every metric,
  keyed by the names the epoch table shows. The recorder and the TensorBoard timeline are left
  as they were.
- `get_preds`: Lightning's ``Trainer.predict`` on a fresh Trainer, with a callback that keeps
  each batch's outputs, targets, per-item losses (and inputs) on the CPU; returned in dataset
  order, gathered once from every process under DDP, without the padding a distributed sampler
  adds.
- `predict`: one item or a batch, without a Trainer: eval mode, no gradient, the model's device.

And the rules they share: the activation that turns outputs into probabilities
(`activation_for`), each item's loss from any loss function (`per_item_loss`), a loader that
visits every item once in order (`sequential_loader`), and class names (`find_vocab`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


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
