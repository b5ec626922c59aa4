"""The LightningModule a Learner builds around a plain ``nn.Module`` and a loss function."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


def metric_name(metric: Any, index: int) -> str:
    """``accuracy`` for a function, ``multiclassaccuracy`` for a torchmetrics object, ``metric{i}``
    for a lambda."""
    name = getattr(metric, "__name__", None) or type(metric).__name__
    return f"metric{index}" if name == "<lambda>" else name.lower()


def is_stateful_metric(metric: Any) -> bool:
    """A torchmetrics-like object: ``update`` per batch, ``compute`` and ``reset`` per epoch."""
    return all(callable(getattr(metric, m, None)) for m in ("update", "compute", "reset"))


def split_batch(batch: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``(x, y)`` → ``((x,), (y,))``; ``(x1, x2, y)`` → ``((x1, x2), (y,))`` (the last item is the
    target, as in fastai).

    Raises:
        TypeError: The batch is not a tuple or list of at least two items.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return tuple(batch[:-1]), (batch[-1],)
    raise TypeError(
        f"a batch must be a tuple (inputs..., target) for a model with a loss_func; got "
        f"{describe(batch)}. Make the dataset return (x, y) pairs, or pass a LightningModule "
        "whose training_step reads this batch."
    )


def split_inputs(batch: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The inputs and the target of a batch that may come without a target (prediction).

    A tuple of two or more items is read by `split_batch` (the last item is the target); a
    one-item tuple, a tensor or any other object is inputs alone: ``((x,), ())``.
    """
    if not isinstance(batch, (tuple, list)):
        return (batch,), ()
    if len(batch) == 1:
        return tuple(batch), ()
    return split_batch(batch)


def describe(obj: Any) -> str:
    """A short structural description of a batch: types and tensor shapes."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}:{str(obj.dtype).removeprefix('torch.')}"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(describe(o) for o in obj[:6]) + (", ..." if len(obj) > 6 else "")
        return f"{type(obj).__name__}[{inner}]"
    if isinstance(obj, dict):
        return "dict{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in list(obj.items())[:6]) + "}"
    return type(obj).__name__


class LearnerModule(pl.LightningModule):
    """Train ``model`` with ``loss_func`` and evaluate ``metrics`` on the validation set.

    The optimizer is the Learner's (one for its lifetime), handed to every Trainer through
    ``configure_optimizers``. The module's state dict is the model's, under ``model.``.

    Args:
        model: The network; called as ``model(*inputs)``.
        loss_func: ``loss_func(preds, target) -> scalar tensor``.
        metrics: Functions ``(preds, targets) -> number``, computed on the whole validation set,
            or torchmetrics-like objects (``update``/``compute``/``reset``).
        optimizer: Returns the optimizer to train with.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: Callable[..., torch.Tensor],
        metrics: Sequence[Any] = (),
        optimizer: Callable[[], torch.optim.Optimizer] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_func = loss_func
        self.metric_names = [metric_name(m, i) for i, m in enumerate(metrics)]
        # Stateful metrics are modules that must follow the model to its device.
        self.stateful_metrics = nn.ModuleDict(
            {n: m for n, m in zip(self.metric_names, metrics) if isinstance(m, nn.Module)}
        )
        self.metrics = list(metrics)
        self._optimizer = optimizer
        self._preds: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    @override
    def forward(self, *inputs: Any) -> Any:
        return self.model(*inputs)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, target = split_batch(batch)
        loss = self._scalar_loss(self.loss_func(self._forward(inputs, batch), *target))
        self.log("train_loss", loss, on_step=True, prog_bar=True)
        return loss

    def _scalar_loss(self, loss: Any) -> torch.Tensor:
        """``loss`` if it is what backward needs (a tensor with one value), else an error that
        says how to get one."""
        name = getattr(self.loss_func, "__name__", type(self.loss_func).__name__)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"loss_func ({name}) returned a {type(loss).__name__} ({loss!r}), not a tensor; "
                "compute the loss with torch operations on the model's output so that it can be "
                "backpropagated."
            )
        if loss.numel() != 1:
            raise ValueError(
                f"loss_func ({name}) returned a tensor of shape {tuple(loss.shape)}, one loss per "
                "item; the Learner needs one number per batch: reduce it (reduction='mean', or "
                ".mean() in your function)."
            )
        return loss

    def _forward(self, inputs: tuple[Any, ...], batch: Any) -> Any:
        try:
            return self.model(*inputs)
        except (RuntimeError, TypeError, ValueError) as exc:
            # Say what the model was given: most such errors are a batch of the wrong shape.
            raise type(exc)(
                f"{exc}\n(the model was called as model(*batch[:-1]) on a batch "
                f"{describe(batch)}; make the data match the model's input)"
            ) from exc

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, target = split_batch(batch)
        preds = self._forward(inputs, batch)
        loss = self.loss_func(preds, *target)
        self.log(
            "valid_loss",
            loss,
            on_epoch=True,
            prog_bar=True,
            batch_size=_batch_size(target),
            sync_dist=True,  # under DDP each rank sees a shard of the validation set
        )
        if not self.metrics:
            return
        for metric in self.metrics:
            if is_stateful_metric(metric):
                metric.update(preds, *target)
        self._preds.append(preds.detach())
        self._targets.append(target[0].detach())

    @override
    def on_validation_epoch_start(self) -> None:
        self._preds, self._targets = [], []
        for metric in self.metrics:
            if is_stateful_metric(metric):
                metric.reset()

    @override
    def on_validation_epoch_end(self) -> None:
        if not self._preds:
            return
        preds, targets = torch.cat(self._preds), torch.cat(self._targets)
        for name, metric in zip(self.metric_names, self.metrics):
            value = metric.compute() if is_stateful_metric(metric) else metric(preds, targets)
            if not _is_number(value):
                raise TypeError(
                    f"metric {name!r} returned {value!r} ({type(value).__name__}); a metric must "
                    "return a number (a float or a one-element tensor), e.g. accuracy(preds, "
                    "targets) -> tensor(0.93)."
                )
            # Under DDP: the mean of the ranks' values (exact for accuracy-like metrics over equal
            # shards; torchmetrics objects already compute over every rank).
            self.log(
                name, torch.as_tensor(value, dtype=torch.float32), prog_bar=True, sync_dist=True
            )
        self._preds, self._targets = [], []

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self._forward(split_inputs(batch)[0], batch)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            raise RuntimeError("LearnerModule has no optimizer; it is trained through a Learner.")
        return self._optimizer()


def _batch_size(target: tuple[Any, ...]) -> int | None:
    first = target[0]
    return len(first) if hasattr(first, "__len__") else None


def make_module(
    model: Any, loss_func: Any, metrics: Any, optimizer: Callable[[], torch.optim.Optimizer]
) -> pl.LightningModule:
    """``model`` itself if it is a ``LightningModule``, else a `LearnerModule` around it.

    Raises:
        TypeError: ``model`` is not a module; a plain module comes without a callable
            ``loss_func``; a metric is not callable.
    """
    if isinstance(model, pl.LightningModule):
        if loss_func is not None or metrics:
            warnings.warn(
                "loss_func and metrics are ignored for a LightningModule: its training_step and "
                "validation_step compute and log them.",
                stacklevel=3,
            )
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module or a LightningModule, got {type(model).__name__}."
        )
    if loss_func is None:
        raise TypeError(
            f"a plain nn.Module ({type(model).__name__}) needs a loss_func, e.g. "
            "Learner(model, data, loss_func=F.cross_entropy); or pass a LightningModule."
        )
    if not callable(loss_func):
        raise TypeError(f"loss_func must be callable (preds, target) -> loss, got {loss_func!r}.")
    if metrics is None:
        metrics = []
    elif callable(metrics) or isinstance(metrics, nn.Module):  # one metric, not a list
        metrics = [metrics]
    metrics = list(metrics)
    for m in metrics:
        if not callable(m) and not hasattr(m, "compute"):
            raise TypeError(f"metric {m!r} is not callable (preds, targets) -> number.")
    return LearnerModule(model, loss_func, metrics, optimizer)


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and (value.is_floating_point() or not value.is_complex())
    return isinstance(value, (int, float)) and not isinstance(value, bool)
