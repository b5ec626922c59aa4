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
visits every item once in order (`sequential_loader`), and class names (`find_vocab`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler
from typing_extensions import override

from difflr.checks import check_callable
from difflr.data import Data, check_loader, loader_length
from difflr.distributed import is_distributed
from difflr.module import split_inputs
from difflr.runner import Runner

__all__ = [
    "Activation",
    "Predictions",
    "activate",
    "activation_for",
    "check_vocab",
    "collect_predictions",
    "exp_of_log_probs",
    "find_vocab",
    "get_preds",
    "identity",
    "is_multi_label",
    "is_single_label",
    "loss_func_of",
    "per_item_loss",
    "predict",
    "sequential_loader",
    "sigmoid",
    "softmax_over_classes",
    "validate",
]

Activation = Callable[[torch.Tensor], torch.Tensor]

#: Probability above which `predict` calls a label present, for multi-label (sigmoid) models.
MULTI_LABEL_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- activations
def softmax_over_classes(preds: torch.Tensor) -> torch.Tensor:
    """Softmax over the class dimension, dim 1 (``(N, C)``, ``(N, C, H, W)``), where
    cross-entropy reads the classes."""
    return preds.softmax(dim=1 if preds.ndim > 1 else 0)


def exp_of_log_probs(preds: torch.Tensor) -> torch.Tensor:
    """``exp``: probabilities from the log-probabilities that ``nll_loss`` reads."""
    return preds.exp()


def sigmoid(preds: torch.Tensor) -> torch.Tensor:
    """Each output's own probability, for binary cross-entropy with logits (multi-label)."""
    return torch.sigmoid(preds)


def identity(preds: Any) -> Any:
    """The outputs as they are."""
    return preds


def _unwrap(loss_func: Any) -> Any:
    while isinstance(loss_func, functools.partial):
        loss_func = loss_func.func
    return loss_func


def activation_for(loss_func: Any) -> Activation:
    """The activation that turns a model's outputs into what its loss compares with the targets:
    the default ``act`` of `get_preds`.

    The rule, first match wins:

    1. the loss's own ``activation`` attribute, if it is callable (fastai's convention: give
       your loss class one);
    2. cross-entropy (``F.cross_entropy``, ``nn.CrossEntropyLoss`` and its subclasses, also
       inside a ``functools.partial``) → softmax over the classes (dim 1);
    3. binary cross-entropy with logits (``F.binary_cross_entropy_with_logits``,
       ``nn.BCEWithLogitsLoss``) → sigmoid;
    4. negative log-likelihood (``F.nll_loss``, ``nn.NLLLoss``) → ``exp``;
    5. anything else (``F.mse_loss``, a function of your own, no loss at all) → identity.

    Args:
        loss_func: The loss function, or ``None``.

    Examples:
        >>> activation_for(F.cross_entropy)(torch.tensor([[0.0, 0.0]]))
        tensor([[0.5000, 0.5000]])
        >>> activation_for(lambda preds, target: (preds - target).abs().mean()) is identity
        True
    """
    own = getattr(loss_func, "activation", None)
    if callable(own):
        return own
    loss = _unwrap(loss_func)
    if loss is F.cross_entropy or isinstance(loss, nn.CrossEntropyLoss):
        return softmax_over_classes
    if loss is F.binary_cross_entropy_with_logits or isinstance(loss, nn.BCEWithLogitsLoss):
        return sigmoid
    if loss is F.nll_loss or isinstance(loss, nn.NLLLoss):
        return exp_of_log_probs
    return identity


def is_single_label(act: Any) -> bool:
    """Whether ``act`` makes one probability per class that sum to 1 (one label per item)."""
    return act in (softmax_over_classes, exp_of_log_probs)


def is_multi_label(act: Any) -> bool:
    """Whether ``act`` makes an independent probability per output (any number of labels)."""
    return act is sigmoid


def check_act(act: Activation | None) -> None:
    """Refuse an ``act`` that is not callable, before the prediction pass rather than after it."""
    if act is not None:
        check_callable(act, "act", "act(preds) -> tensor")


def activate(preds: Any, act: Activation | None, module: pl.LightningModule) -> Any:
    """``act(preds)``; with ``act=None``, `activation_for` the module's loss function, applied
    to a tensor of outputs (a tuple or dict of outputs is returned as it is: the rule does not
    know which one to activate)."""
    if act is not None:
        return act(preds)
    if isinstance(preds, torch.Tensor):
        return activation_for(loss_func_of(module))(preds)
    return preds


def loss_func_of(module: pl.LightningModule) -> Callable[..., torch.Tensor] | None:
    """The loss function of a module: a Learner's ``loss_func``, or a ``loss_func`` attribute
    of your own ``LightningModule``; ``None`` when there is none."""
    loss_func = getattr(module, "loss_func", None)
    return loss_func if callable(loss_func) else None


# ----------------------------------------------------------------------------- per-item losses
def per_item_loss(
    loss_func: Callable[..., torch.Tensor], preds: Any, target: Sequence[Any]
) -> torch.Tensor:
    """Each item's loss, shape ``(n_items,)``: what ``loss_func`` gives for that item alone.

    Three ways, the first that applies:

    1. a loss object with a ``reduction`` attribute (``nn.CrossEntropyLoss()``, fastai's losses)
       is called through a shallow copy with ``reduction="none"`` (yours is not changed);
    2. a function with a ``reduction`` parameter (``F.cross_entropy``, also in a
       ``functools.partial``) is called with ``reduction="none"``;
    3. any other function is called once per item, on a batch of one.

    An unreduced loss with more dimensions than the items (pixels, outputs) is averaged over
    them, which is what the loss of a batch of one gives.

    Args:
        loss_func: Called as ``loss_func(preds, *target)``.
        preds: The model's outputs for a batch (a tensor, or a tuple/dict of them).
        target: The batch's target(s).

    Raises:
        ValueError: ``loss_func`` gives something other than one number for one item.

    Examples:
        >>> preds, target = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])
        >>> per_item_loss(F.cross_entropy, preds, (target,))
        tensor([0.1269, 2.1269])
        >>> per_item_loss(lambda p, t: F.cross_entropy(p, t), preds, (target,))
        tensor([0.1269, 2.1269])
    """
    n = _n_items(preds)
    losses = None
    if isinstance(getattr(loss_func, "reduction", None), str):
        unreduced = copy.copy(loss_func)
        unreduced.reduction = "none"
        losses = unreduced(preds, *target)
    elif _has_parameter(loss_func, "reduction"):
        losses = loss_func(preds, *target, reduction="none")
    if isinstance(losses, torch.Tensor) and losses.ndim >= 1 and losses.shape[0] == n:
        return losses.detach().reshape(n, -1).float().mean(dim=1)
    # A function without `reduction` (or one that ignores it): a batch of one per item.
    items = []
    for i in range(n):
        loss = loss_func(
            _take(preds, slice(i, i + 1)), *(_take(t, slice(i, i + 1)) for t in target)
        )
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_func gave {type(loss).__name__}"
                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''} for a batch of "
                "one item; per-item losses need a loss_func that returns one number per batch."
            )
        items.append(loss.detach().reshape(()).float())
    return torch.stack(items) if items else torch.empty(0)


def _has_parameter(func: Any, name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


# ----------------------------------------------------------------------------- loaders
#: The DataLoader arguments a rebuilt loader keeps (those this torch has).
_LOADER_ARGS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


def sequential_loader(loader: Any, name: str = "dl") -> Any:
    """``loader`` as `validate` and `get_preds` read it: every item once, in dataset order.

    A ``DataLoader`` that shuffles (or has any other sampler than a sequential one: weighted,
    distributed) or drops its last incomplete batch is **rebuilt** without either, keeping its
    dataset, ``batch_size``, ``collate_fn`` and worker settings, as fastai's ``get_preds``
    does; the loader you passed is not changed. A ``DataLoader`` subclass is not rebuilt (its
    own arguments would be lost): one that shuffles or drops is refused. Loaders with a custom
    batch sampler, ``IterableDataset`` loaders and other iterables are read as they are
    (`get_preds` checks afterwards that every item came once).

    Args:
        loader: What to read.
        name: The argument's name in messages.

    Raises:
        ValueError: A ``DataLoader`` subclass that shuffles or drops its last batch.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.arange(10.0))
        >>> rebuilt = sequential_loader(DataLoader(ds, batch_size=4, shuffle=True, drop_last=True))
        >>> [batch[0].tolist() for batch in rebuilt]
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]
    """
    if (
        not isinstance(loader, DataLoader)
        or isinstance(loader.dataset, IterableDataset)
        or loader.batch_size is None  # a custom batch sampler: Lightning tracks its indices
    ):
        return loader
    shuffles = not isinstance(loader.sampler, SequentialSampler)
    if not (shuffles or loader.drop_last):
        return loader
    if type(loader) is not DataLoader:
        reasons = [
            reason
            for reason, applies in (
                (f"samples with a {type(loader.sampler).__name__}", shuffles),
                ("drops its last incomplete batch", loader.drop_last),
            )
            if applies
        ]
        raise ValueError(
            f"{name} is a {type(loader).__name__}, a DataLoader subclass that "
            f"{' and '.join(reasons)}; difflr rebuilds only plain DataLoaders (a subclass's own "
            f"arguments would be lost). Pass one with shuffle=False and drop_last=False as {name}."
        )
    accepted = inspect.signature(DataLoader).parameters
    kwargs = {k: getattr(loader, k) for k in _LOADER_ARGS if k in accepted and hasattr(loader, k)}
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, shuffle=False, drop_last=False, **kwargs
    )


def _defines(obj: Any, hook: str, base: type) -> bool:
    """Whether ``obj`` has its own ``hook`` (a method of its class or an attribute), not
    ``base``'s placeholder."""
    return hook in vars(obj) or getattr(type(obj), hook, None) is not getattr(base, hook)


def _no_validation_set(what: str, where: str) -> ValueError:
    return ValueError(
        f"{what} has no data to read: {where}. Pass dl= (a DataLoader of (x, y) batches), or "
        "give the Learner a validation set: Learner(model, (train_dl, valid_dl), ...)."
    )


def _validation_source(data: Data, module: pl.LightningModule, what: str) -> Any:
    """Where the validation set comes from: a loader, the datamodule, or the module itself."""
    if data.valid_dl is not None:
        return data.valid_dl
    if data.datamodule is not None:
        if not _defines(data.datamodule, "val_dataloader", pl.LightningDataModule):
            raise _no_validation_set(
                what, f"the datamodule {type(data.datamodule).__name__} has no val_dataloader()"
            )
        return data.datamodule
    if _defines(module, "val_dataloader", pl.LightningModule):
        return module  # Lightning's fit reads it too when no validation loader is given
    raise _no_validation_set(what, "the Learner was given no validation loader")


def validation_loader(data: Data, module: pl.LightningModule, what: str) -> Any:
    """The validation loader itself: the Learner's, or the datamodule's (after its
    ``setup("validate")``, as ``Trainer.validate`` would call it), or the module's own.

    Raises:
        ValueError: There is no validation set, or several validation loaders.
    """
    source = _validation_source(data, module, what)
    if isinstance(source, pl.LightningDataModule):
        source.setup("validate")
        source = source.val_dataloader()
    elif isinstance(source, pl.LightningModule):
        source = source.val_dataloader()
    if isinstance(source, (tuple, list)):
        if len(source) != 1:
            raise ValueError(
                f"{what}: val_dataloader() returned {len(source)} loaders; pass the one to read "
                "as dl=."
            )
        source = source[0]
    check_loader(source, "the validation loader")
    return source


# ----------------------------------------------------------------------------- class names
def check_vocab(vocab: Any) -> list[Any] | None:
    """Class names, index ``i`` → ``vocab[i]``, as a list; ``None`` for none.

    Raises:
        TypeError: ``vocab`` is a string, a mapping or not a sequence.
        ValueError: ``vocab`` is empty or repeats a name.
    """
    if vocab is None:
        return None
    if isinstance(vocab, (str, bytes, Mapping)) or not hasattr(vocab, "__iter__"):
        raise TypeError(
            f"vocab must be a sequence of class names (index i -> vocab[i]), got "
            f"{type(vocab).__name__}; e.g. vocab=['cat', 'dog']."
        )
    names = [v.item() if isinstance(v, np.generic) else v for v in vocab]
    if not names:
        raise ValueError("vocab is empty; pass one name per class, or None for class indices.")
    if len({str(n) for n in names}) != len(names):
        raise ValueError(f"vocab repeats a name: {names!r}; pass one distinct name per class.")
    return names


def _classes_of(obj: Any, depth: int = 4) -> list[Any] | None:
    """``obj.vocab`` or ``obj.classes``, else its ``dataset``'s (a ``Subset`` of an
    ``ImageFolder``), a few levels down."""
    for _ in range(depth):
        if obj is None:
            return None
        for attr in ("vocab", "classes"):
            names = getattr(obj, attr, None)
            if isinstance(names, (list, tuple, np.ndarray)) and len(names) > 0:
                return check_vocab(names)
        obj = getattr(obj, "dataset", None)
    return None


def find_vocab(data: Data) -> list[Any] | None:
    """Class names the data knows: the ``vocab`` or ``classes`` of the datamodule, else of the
    validation loader's dataset, else of the training loader's (torchvision's ``ImageFolder``
    has ``classes``); ``None`` when none has them.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.zeros(4, 2), torch.zeros(4))
        >>> ds.classes = ["cat", "dog"]
        >>> find_vocab(Data(DataLoader(ds)))
        ['cat', 'dog']
    """
    for source in (data.datamodule, data.valid_dl, data.train_dl):
        names = _classes_of(source)
        if names is not None:
            return names
    return None


def _name(vocab: Sequence[Any] | None, index: int) -> Any:
    return index if vocab is None else vocab[index]


def check_vocab_fits(vocab: Sequence[Any] | None, n_classes: int) -> None:
    if vocab is not None and len(vocab) != n_classes:
        raise ValueError(
            f"learn.vocab has {len(vocab)} names but the model gives {n_classes} class scores; "
            f"set learn.vocab to {n_classes} names (or None for indices)."
        )


# ----------------------------------------------------------------------------- nested outputs
def _n_items(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.ndim else 1
    if isinstance(obj, Mapping):
        return _n_items(next(iter(obj.values())))
    if isinstance(obj, (tuple, list)) and obj and _is_container_of_tensors(obj):
        return _n_items(obj[0])
    return len(obj)


def _is_container_of_tensors(obj: Sequence[Any]) -> bool:
    return all(isinstance(o, (torch.Tensor, tuple, list, Mapping)) for o in obj)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_cpu(o) for o in obj)
    return obj


def _concat(parts: list[Any]) -> Any:
    """Batches → one: tensors concatenated, tuples and dicts element by element, other
    sequences (strings, ids) flattened."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([p.reshape(1) if p.ndim == 0 else p for p in parts])
    if isinstance(first, Mapping):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)) and first and _is_container_of_tensors(first):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return [item for p in parts for item in p]


def _take(obj: Any, index: int | slice | np.ndarray) -> Any:
    """Item ``index``, or items ``index`` (a slice or an index array), of a batch-like object."""
    if isinstance(obj, torch.Tensor):
        return obj[torch.as_tensor(index)] if isinstance(index, np.ndarray) else obj[index]
    if isinstance(obj, Mapping):
        return {k: _take(v, index) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)) and obj and _is_container_of_tensors(obj):
        return type(obj)(_take(o, index) for o in obj)
    if isinstance(index, np.ndarray):
        return [obj[i] for i in index]
    return obj[index]


# ----------------------------------------------------------------------------- get_preds
@dataclass
class Predictions:
    """What `collect_predictions` read, on the CPU, in dataset order.

    Attributes:
        preds: The model's outputs, before any activation (a tensor, or a tuple/dict of them).
        targets: The batches' targets, or ``None`` when the batches have none.
        losses: Each item's loss, shape ``(n_items,)``, or ``None`` unless asked for.
        inputs: The batches' inputs (a tensor, or a tuple for several), or ``None`` unless
            asked for.
    """

    preds: Any
    targets: Any
    losses: torch.Tensor | None
    inputs: Any


class _Collector(BasePredictionWriter):
    """Keep each batch's dataset indices, outputs, targets, per-item losses and inputs, on the
    CPU as they come (Lightning's predict loop runs without autograd, so no graph is kept)."""

    def __init__(self, loss_func: Callable[..., torch.Tensor] | None, with_input: bool) -> None:
        super().__init__(write_interval="batch")
        self.loss_func = loss_func
        self.with_input = with_input
        self.indices: list[list[int]] = []
        self.preds: list[Any] = []
        self.targets: list[Any] = []
        self.losses: list[torch.Tensor] = []
        self.inputs: list[Any] = []

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if prediction is None:
            raise ValueError(
                f"{type(pl_module).__name__}.predict_step returned None; get_preds needs the "
                "model's outputs for the batch."
            )
        inputs, target = split_inputs(batch)
        if batch_indices:
            self.indices.append(list(batch_indices))
        self.preds.append(_to_cpu(prediction))
        if target:
            self.targets.append(_to_cpu(target[0]))
        if self.loss_func is not None:
            if not target:
                raise ValueError(
                    "with_loss=True, but the batches carry no target; pass batches (x, y)."
                )
            self.losses.append(per_item_loss(self.loss_func, prediction, target).cpu())
        if self.with_input:
            self.inputs.append(_to_cpu(inputs[0] if len(inputs) == 1 else inputs))

    def result(self) -> dict[str, Any]:
        """This process's batches joined: plain tensors and lists, ready to be gathered."""
        return {
            "indices": np.concatenate(self.indices).astype(np.int64) if self.indices else None,
            "preds": _concat(self.preds) if self.preds else None,
            "targets": _concat(self.targets) if self.targets else None,
            "losses": torch.cat(self.losses) if self.losses else None,
            "inputs": _concat(self.inputs) if self.inputs else None,
        }


@contextmanager
def _predict_on_inputs(module: pl.LightningModule) -> Iterator[None]:
    """Make a ``LightningModule`` without a ``predict_step`` of its own predict with its
    ``forward`` on the batch's inputs.

    Lightning's default ``predict_step`` calls ``forward`` on the whole batch, target included.
    An instance attribute shadows it for one run; the class is never touched.
    """
    if _defines(module, "predict_step", pl.LightningModule):
        yield
        return

    def predict_step(batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Any:
        return module(*split_inputs(batch)[0])

    module.predict_step = predict_step
    try:
        yield
    finally:
        del module.predict_step


def _gather(trainer: pl.Trainer, part: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's part, in rank order, on every process (one collective call)."""
    if not is_distributed(trainer):
        return [part]
    parts: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, part)
    return parts


def _dataset_order(
    indices: np.ndarray, loader: Any, world_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The positions that put the items in dataset order, each item once.

    A distributed sampler pads its shards to equal length with repeated items, and a custom
    batch sampler may repeat some: every item is kept once. An item that never came is an
    error (the results would not line up with the dataset).
    """
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    order, seen = order[first], ordered[first]
    n = loader_length(getattr(loader, "dataset", None))
    if n is not None and not np.array_equal(seen, np.arange(n)):
        missing = n - int(np.isin(np.arange(n), seen).sum())
        raise ValueError(
            f"get_preds read {len(seen)} distinct items of a dataset of {n} ({missing} never "
            f"came, in {world_size} process(es)): the loader's batch sampler "
            f"({type(getattr(loader, 'batch_sampler', None)).__name__}) or limit_predict_batches "
            "skips items. Pass a DataLoader with shuffle=False and drop_last=False."
        )
    return order, seen


def read_loader(runner: Runner, dl: Any, caller: str) -> Any:
    """``dl``, or the validation loader when ``None``, made sequential (`sequential_loader`):
    what `collect_predictions` reads.

    Raises:
        TypeError: ``dl`` is not a loader.
        ValueError: ``dl`` is ``None`` and there is no validation set.
    """
    if dl is None:
        return sequential_loader(validation_loader(runner.data, runner.module, caller))
    check_loader(dl, "dl")
    return sequential_loader(dl)


def indexed(loader: Any) -> bool:
    """Whether ``loader`` reads a map-style dataset, so its items can be found by index."""
    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)


def collect_predictions(
    runner: Runner, dl: Any = None, *, with_input: bool = False, with_loss: bool = False
) -> Predictions:
    """Run ``Trainer.predict`` on ``dl`` (or the validation set) and keep everything, in
    dataset order; see `get_preds`.

    Raises:
        TypeError: ``with_loss`` for a module without a loss function; ``dl`` is not a loader.
        ValueError: No validation set; an empty loader; a loader without item indices under
            DDP; items that never came.
    """
    module = runner.module
    loader = read_loader(runner, dl, "get_preds")
    loss_func = loss_func_of(module) if with_loss else None
    if with_loss and loss_func is None:
        raise TypeError(
            f"with_loss=True needs a loss function, and {type(module).__name__} has none; give "
            "your LightningModule a loss_func attribute (e.g. self.loss_func = "
            "nn.CrossEntropyLoss()), called as loss_func(preds, target)."
        )
    collector = _Collector(loss_func, with_input)
    trainer = runner.trainer([*runner.callbacks, collector], standard=False, logger=False)
    if trainer.world_size > 1 and not indexed(loader):
        raise ValueError(
            f"get_preds under {trainer.world_size} processes needs a DataLoader over a map-style "
            f"dataset (items by index) to put the shards back in order; got "
            f"{type(loader).__name__}. Run get_preds in one process for this loader."
        )
    with _predict_on_inputs(module), warnings.catch_warnings():
        # Said by Lightning for a loader without item indices; the order is then the loader's.
        warnings.filterwarnings("ignore", "Couldn't infer the batch indices")
        runner.predict(trainer, dataloaders=loader)
    parts = [p for p in _gather(trainer, collector.result()) if p["preds"] is not None]
    if not parts:
        raise ValueError(f"get_preds read no batch from {type(loader).__name__}; it is empty.")
    joined = {key: _join([p[key] for p in parts]) for key in parts[0]}
    indices = joined.pop("indices")
    if indices is not None:
        order, _ = _dataset_order(indices, loader, trainer.world_size)
        joined = {key: None if v is None else _take(v, order) for key, v in joined.items()}
    return Predictions(joined["preds"], joined["targets"], joined["losses"], joined["inputs"])


def _join(parts: list[Any]) -> Any:
    if any(p is None for p in parts):
        return None
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return _concat(parts)


def get_preds(
    runner: Runner,
    dl: Any = None,
    with_input: bool = False,
    with_loss: bool = False,
    act: Activation | None = None,
) -> tuple[Any, ...]:
    """Predictions and targets for every item of ``dl`` (or the validation set), in dataset
    order: ``(inputs?, preds, targets, losses?)``, as fastai's ``get_preds``.

    Args:
        runner: The Learner's runner (``learn.runner``).
        dl: The loader to read; ``None`` for the validation set. A shuffling or ``drop_last``
            ``DataLoader`` is rebuilt without either (`sequential_loader`).
        with_input: Also return the inputs (first).
        with_loss: Also return each item's loss (last), from the raw outputs.
        act: Applied to the outputs; ``None`` for `activation_for` the module's loss function.

    Returns:
        ``(preds, targets)``, with ``inputs`` first if ``with_input`` and ``losses`` last if
        ``with_loss``; CPU tensors, ``targets`` ``None`` when the batches have no target.
    """
    check_act(act)
    found = collect_predictions(runner, dl, with_input=with_input, with_loss=with_loss)
    result = [activate(found.preds, act, runner.module), found.targets]
    if with_input:
        result.insert(0, found.inputs)
    if with_loss:
        result.append(found.losses)
    return tuple(result)


# ----------------------------------------------------------------------------- validate
def validate(runner: Runner, dl: Any = None) -> dict[str, float]:
    """The loss and every metric on ``dl`` (or the validation set), through
    ``Trainer.validate`` on a fresh Trainer; see ``Learner.validate``.

    Raises:
        TypeError: ``dl`` is not a loader.
        ValueError: No validation set; an empty loader.
    """
    if dl is not None:
        check_loader(dl, "dl")
        data: dict[str, Any] = {"dataloaders": sequential_loader(dl)}
    else:
        source = _validation_source(runner.data, runner.module, "validate")
        if isinstance(source, pl.LightningDataModule):
            data = {"datamodule": source}
        elif isinstance(source, pl.LightningModule):
            data = {}
        else:
            data = {"dataloaders": sequential_loader(source, "the validation loader")}
    # No logger: the values come back to the caller and the timeline stays the fits'.
    trainer = runner.trainer(runner.callbacks, standard=False, logger=False)
    results = runner.validate(trainer, **data)
    return {key: float(value) for key, value in (results[0] if results else {}).items()}


# ----------------------------------------------------------------------------- predict
def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    return obj


def _example_input(data: Data) -> torch.Tensor | None:
    """The first input of the first item of the validation (else training) dataset."""
    for loader in (data.valid_dl, data.train_dl):
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not loader_length(dataset):
            continue
        first = split_inputs(dataset[0])[0][0]
        if isinstance(first, torch.Tensor):
            return first
    return None


def _is_batch(first: Any, data: Data) -> bool:
    """Whether ``first`` (the first input given to `predict`) is a batch, by comparing it with
    an item of the Learner's data."""
    example = _example_input(data)
    if example is None or not isinstance(first, torch.Tensor):
        raise ValueError(
            "predict cannot tell whether x is one item or a batch (the Learner has no "
            "map-style dataset of tensors to compare it with); pass is_batch=True or False."
        )
    if first.ndim == example.ndim:
        return False
    if first.ndim == example.ndim + 1:
        return True
    raise ValueError(
        f"x has shape {tuple(first.shape)}, but the dataset's items have shape "
        f"{tuple(example.shape)}; pass one item of that shape or a batch of them."
    )


def predict(
    runner: Runner,
    x: Any,
    *,
    vocab: Sequence[Any] | None = None,
    is_batch: bool | None = None,
) -> Any:
    """One prediction (or a batch of them) without a Trainer; see ``Learner.predict``.

    Raises:
        ValueError: Whether ``x`` is a batch cannot be told, or its shape fits no item; the
            vocab does not have one name per class.
    """
    module = runner.module
    if is_batch is not None and not isinstance(is_batch, bool):
        raise TypeError(
            f"is_batch must be True, False or None (tell from the data), got {is_batch!r}."
        )
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if is_batch is None:
        is_batch = _is_batch(inputs[0], runner.data)
    if not is_batch:
        inputs = tuple(i.unsqueeze(0) if isinstance(i, torch.Tensor) else [i] for i in inputs)
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            out = module(*_to_device(inputs, _device_of(module)))
    finally:
        for m, training in modes.items():
            m.training = training
    out = _to_cpu(out)
    act = activation_for(loss_func_of(module))
    if isinstance(out, torch.Tensor) and out.ndim >= 2 and is_single_label(act):
        probs = act(out)
        index = probs.argmax(dim=1)
        if out.ndim == 2:
            check_vocab_fits(vocab, out.shape[1])
            decoded: Any = [_name(vocab, int(i)) for i in index]
        else:  # a class per position (segmentation): the index map
            decoded = index
    elif isinstance(out, torch.Tensor) and out.ndim == 2 and is_multi_label(act):
        probs = act(out)
        index = probs > MULTI_LABEL_THRESHOLD
        check_vocab_fits(vocab, out.shape[1])
        decoded = [[_name(vocab, int(j)) for j in row.nonzero().flatten()] for row in index]
    else:
        return out if is_batch else _take(out, 0)
    if is_batch:
        return decoded, index, probs
    return decoded[0], index[0], probs[0]
