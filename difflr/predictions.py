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

Batches are read by `difflr.training.module.unpack_batch`, as in training; the rules they share
are below them: activations and per-item losses in `difflr.training.activations`, loaders and
class names in `difflr.training.loaders`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from difflr.training.activations import (
    MULTI_LABEL_THRESHOLD,
    Activation,
    activate,
    activation_for,
    check_act,
    is_multi_label,
    is_single_label,
    loss_func_of,
    per_item_loss,
)
from difflr.training.data import Data, check_loader, loader_length
from difflr.training.distributed import is_distributed
from difflr.training.loaders import (
    check_vocab_fits,
    class_name,
    defines_hook,
    sequential_loader,
    validation_loader,
    validation_source,
)
from difflr.training.module import unpack_batch
from difflr.training.runner import Runner
from difflr.training.sharding import equal_shards, is_sharding_strategy
from difflr.utils.nested import concat, take, to_cpu, to_device

__all__ = [
    "Predictions",
    "collect_predictions",
    "get_preds",
    "indexed",
    "predict",
    "read_loader",
    "validate",
]


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
        self.parts: list[dict[str, Any]] | None = None  # every rank's result(), gathered

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
        parts = unpack_batch(batch, need_target=False)
        target = parts.target
        if batch_indices:
            self.indices.append(list(batch_indices))
        self.preds.append(to_cpu(prediction))
        if target:
            self.targets.append(to_cpu(target[0]))
        if self.loss_func is not None:
            if not target:
                raise ValueError(
                    "with_loss=True, but the batches carry no target; pass batches (x, y), or "
                    "dicts with the target under 'labels'."
                )
            self.losses.append(per_item_loss(self.loss_func, prediction, target).cpu())
        if self.with_input:
            self.inputs.append(to_cpu(parts.inputs))

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Gathered here, while the processes can still talk (a forked worker's cannot later).
        self.parts = _gather(trainer, self.result())

    def handback_state(self) -> list[dict[str, Any]] | None:
        """What a worker process (``ddp_notebook``) hands back: every rank's batches."""
        return self.parts

    def load_handback_state(self, state: list[dict[str, Any]] | None) -> None:
        self.parts = state

    def result(self) -> dict[str, Any]:
        """This process's batches joined: plain tensors and lists, ready to be gathered."""
        return {
            "indices": np.concatenate(self.indices).astype(np.int64) if self.indices else None,
            "preds": concat(self.preds) if self.preds else None,
            "targets": concat(self.targets) if self.targets else None,
            "losses": torch.cat(self.losses) if self.losses else None,
            "inputs": concat(self.inputs) if self.inputs else None,
        }


@contextmanager
def _predict_on_inputs(module: pl.LightningModule) -> Iterator[None]:
    """Make a ``LightningModule`` without a ``predict_step`` of its own predict with its
    ``forward`` on the batch's inputs.

    Lightning's default ``predict_step`` calls ``forward`` on the whole batch, target included.
    An instance attribute shadows it for one run; the class is never touched. A dict batch is
    still handed over whole, as Lightning does: a LightningModule reads its dicts its own way.
    """
    if defines_hook(module, "predict_step", pl.LightningModule):
        yield
        return

    def predict_step(batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Any:
        if isinstance(batch, Mapping):
            return module(batch)
        return module(*unpack_batch(batch, need_target=False).args)

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
    if is_sharding_strategy(trainer.strategy) and indexed(loader):
        loader = equal_shards(loader, trainer.global_rank, trainer.world_size)
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
    gathered = collector.parts if collector.parts is not None else [collector.result()]
    parts = [p for p in gathered if p["preds"] is not None]
    if not parts:
        raise ValueError(f"get_preds read no batch from {type(loader).__name__}; it is empty.")
    joined = {key: _join([p[key] for p in parts]) for key in parts[0]}
    indices = joined.pop("indices")
    if indices is not None:
        order, _ = _dataset_order(indices, loader, trainer.world_size)
        joined = {key: None if v is None else take(v, order) for key, v in joined.items()}
    return Predictions(joined["preds"], joined["targets"], joined["losses"], joined["inputs"])


def _join(parts: list[Any]) -> Any:
    if any(p is None for p in parts):
        return None
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return concat(parts)


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
        source = validation_source(runner.data, runner.module, "validate")
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


def _example_input(data: Data) -> torch.Tensor | None:
    """The first input of the first item of the validation (else training) dataset."""
    for loader in (data.valid_dl, data.train_dl):
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not loader_length(dataset):
            continue
        args = unpack_batch(dataset[0], need_target=False).args
        first = args[0] if args else None
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
            out = module(*to_device(inputs, _device_of(module)))
    finally:
        for m, training in modes.items():
            m.training = training
    out = to_cpu(out)
    act = activation_for(loss_func_of(module))
    if isinstance(out, torch.Tensor) and out.ndim >= 2 and is_single_label(act):
        probs = act(out)
        index = probs.argmax(dim=1)
        if out.ndim == 2:
            check_vocab_fits(vocab, out.shape[1])
            decoded: Any = [class_name(vocab, int(i)) for i in index]
        else:  # a class per position (segmentation): the index map
            decoded = index
    elif isinstance(out, torch.Tensor) and out.ndim == 2 and is_multi_label(act):
        probs = act(out)
        index = probs > MULTI_LABEL_THRESHOLD
        check_vocab_fits(vocab, out.shape[1])
        decoded = [[class_name(vocab, int(j)) for j in row.nonzero().flatten()] for row in index]
    else:
        return out if is_batch else take(out, 0)
    if is_batch:
        return decoded, index, probs
    return decoded[0], index[0], probs[0]
