"""The LightningModule a Learner builds around a plain ``nn.Module`` and a loss function.

Batches come in two shapes. A tuple ``(inputs..., target)`` calls ``model(*inputs)``, as in fastai.
A dict (what Hugging Face loaders and collators give: ``input_ids``, ``attention_mask``,
``labels``, ...) calls ``model(**inputs)``; its target is the ``labels`` entry (or ``label`` /
``label_ids``, the names Hugging Face's collators rename to ``labels``). With a ``loss_func`` the
model is called without the target and the loss is ``loss_func(preds, target)``; without one the
model computes its own: the target goes in as ``labels=`` and the loss is ``output.loss``. A model
output with a ``.logits`` (a Hugging Face ``ModelOutput``) hands the logits to ``loss_func`` and to
the metrics; any other output is handed over as it is. `forward_batch` does all of this for one
batch; `unpack_batch`, `call_model`, `output_preds` and `output_loss` are its parts.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from difflr.utils.checks import is_number, user_stacklevel

__all__ = [
    "TARGET_KEYS",
    "Batch",
    "LearnerModule",
    "Metric",
    "StepOutput",
    "call_loss",
    "call_model",
    "computes_own_loss",
    "describe",
    "forward_batch",
    "is_stateful_metric",
    "make_module",
    "metric_name",
    "output_loss",
    "output_preds",
    "training_with",
    "unpack_batch",
]

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


def metric_name(metric: Any, index: int) -> str:
    """``accuracy`` for a function, ``multiclassaccuracy`` for a torchmetrics object, ``metric{i}``
    for a lambda."""
    name = getattr(metric, "__name__", None) or type(metric).__name__
    return f"metric{index}" if name == "<lambda>" else name.lower()


def is_stateful_metric(metric: Any) -> bool:
    """A torchmetrics-like object: ``update`` per batch, ``compute`` and ``reset`` per epoch."""
    return all(callable(getattr(metric, m, None)) for m in ("update", "compute", "reset"))


#: The keys a dict batch may hold its target under, in order of preference: ``labels`` is what
#: Hugging Face models take; its collators rename ``label`` and ``label_ids`` to it.
TARGET_KEYS = ("labels", "label", "label_ids")


class Batch(NamedTuple):
    """A batch taken apart: what the model is called with, and the target.

    Attributes:
        args: Positional inputs (a tuple batch without its last item).
        kwargs: Keyword inputs (a dict batch without its target).
        target: ``(target,)``, or ``()`` when the batch has none.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: tuple[Any, ...]

    @property
    def inputs(self) -> Any:
        """The inputs as one object: the only positional input, several as a tuple, or the
        keyword inputs as a dict."""
        if self.kwargs or not self.args:
            return self.kwargs
        return self.args[0] if len(self.args) == 1 else self.args


class StepOutput(NamedTuple):
    """What one batch gives: the predictions (logits), the target and the loss.

    Attributes:
        preds: The model's output, or its ``.logits`` when it has them.
        target: ``(target,)``, or ``()`` when the batch has none.
        loss: ``loss_func(preds, target)``, or the model's own ``output.loss``.
        output: The model's raw output.
    """

    preds: Any
    target: tuple[Any, ...]
    loss: torch.Tensor
    output: Any


def unpack_batch(batch: Any, need_target: bool = True) -> Batch:
    """Take a batch apart into the model's inputs and the target: the one place that does.

    Training, validation, prediction and the after-fit analysis all read batches here, so a
    target that ``fit`` trains on is the target ``get_preds`` returns.

    Args:
        batch: A tuple or list ``(inputs..., target)`` (the last item is the target, as in
            fastai), or a dict (or any mapping, such as Hugging Face's ``BatchEncoding``) of
            keyword inputs with the target under ``"labels"`` (or ``"label"``,
            ``"label_ids"``). Without ``need_target``, also inputs alone: a dict without a
            target, a one-item tuple, a tensor or any other object.
        need_target: Raise when the batch has no target (a loss function or metrics need it);
            ``False`` for prediction, or a model that needs no labels for its own loss.

    Raises:
        TypeError: The batch has no target where one is needed: a dict without one, or
            anything but a tuple of two or more items.

    Examples:
        >>> import torch
        >>> unpack_batch({"input_ids": torch.ones(2, 3), "labels": torch.zeros(2)}).target
        (tensor([0., 0.]),)
        >>> unpack_batch((torch.ones(2, 3),), need_target=False).target
        ()
    """
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        if key is None and need_target:
            raise TypeError(
                f"a dict batch must hold its target under 'labels' when a loss_func or metrics "
                f"need it; got {describe(batch)}. Add the labels to the batch (Hugging Face's "
                "collators do), or use loss_func=None with a model that computes its own loss."
            )
        kwargs = {k: v for k, v in batch.items() if k != key}
        return Batch((), kwargs, () if key is None else (batch[key],))
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return Batch(tuple(batch[:-1]), {}, (batch[-1],))
    if need_target:
        raise TypeError(
            f"a batch must be a tuple (inputs..., target) for a model with a loss_func; got "
            f"{describe(batch)}. Make the dataset return (x, y) pairs, or pass a LightningModule "
            "whose training_step reads this batch."
        )
    return Batch(tuple(batch) if isinstance(batch, (tuple, list)) else (batch,), {}, ())


def call_model(model: Any, batch: Batch, with_labels: bool = False, raw: Any = None) -> Any:
    """``model(*batch.args, **batch.kwargs)``, with ``labels=target`` added when ``with_labels``
    (for a model that computes its own loss). An error from the model gets a line that says what
    it was called with (``raw``: the batch as the loader gave it)."""
    kwargs = batch.kwargs
    if with_labels and batch.target:
        kwargs = {**kwargs, "labels": batch.target[0]}
    try:
        return model(*batch.args, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        # Say what the model was given: most such errors are a batch of the wrong shape.
        how = "model(**batch)" if not batch.args else "model(*batch[:-1])"
        raise type(exc)(
            f"{exc}\n(the model was called as {how} on a batch "
            f"{describe(raw if raw is not None else batch)}; make the data match the model's "
            "input)"
        ) from exc


def _field(output: Any, name: str) -> Any:
    if isinstance(output, torch.Tensor):
        return None
    value = getattr(output, name, None)
    if value is None and isinstance(output, Mapping):
        value = output.get(name)
    return value


def output_preds(output: Any) -> Any:
    """The predictions in a model's output: its ``.logits`` (or ``["logits"]``) when it has them
    (a Hugging Face ``ModelOutput``), else the output itself."""
    logits = _field(output, "logits")
    return output if logits is None else logits


def output_loss(output: Any) -> torch.Tensor | None:
    """The loss a model computed itself: its output's ``.loss`` (or ``["loss"]``), else ``None``."""
    return _field(output, "loss")


def forward_batch(
    model: Any, batch: Any, loss_func: Callable[..., torch.Tensor] | None
) -> StepOutput:
    """Run ``model`` on one batch and compute the loss, for a tuple or a dict batch.

    With ``loss_func`` the model is called without the target and the loss is
    ``loss_func(preds, target)``. Without one (``None``) the target is passed as ``labels=`` and
    the loss is the model's own ``output.loss``, as Hugging Face models compute it.

    Raises:
        TypeError: The batch has no target where ``loss_func`` needs one; ``loss_func`` is
            ``None`` and the model returned no ``.loss``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2)
        >>> step = forward_batch(model, (torch.ones(4, 3), torch.zeros(4).long()),
        ...                      nn.functional.cross_entropy)
        >>> step.preds.shape, step.loss.ndim
        (torch.Size([4, 2]), 0)
    """
    parts = unpack_batch(batch, need_target=loss_func is not None)
    output = call_model(model, parts, with_labels=loss_func is None, raw=batch)
    preds = output_preds(output)
    if loss_func is not None:
        return StepOutput(preds, parts.target, call_loss(loss_func, preds, parts.target), output)
    loss = output_loss(output)
    if loss is None:
        given = "with labels=" if parts.target else "without labels (the batch has none)"
        hint = " (a Hugging Face model returns a tuple when return_dict=False)"
        raise TypeError(
            f"loss_func is None, so the model's own loss is used, but {type(model).__name__} "
            f"returned {type(output).__name__} with no .loss when called {given}. Put the target "
            "in the batch under 'labels', or pass a loss_func."
            + (hint if isinstance(output, tuple) else "")
        )
    return StepOutput(preds, parts.target, loss, output)


#: The regression losses that a classifier's integer labels are a mistake for.
_REGRESSION_LOSSES = ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "MSELoss", "L1Loss")


def call_loss(
    loss_func: Callable[..., torch.Tensor], preds: Any, target: tuple[Any, ...]
) -> torch.Tensor:
    """``loss_func(preds, *target)``; when it fails, the same error type re-raised with what the
    Learner knows: the output's and the target's shapes and dtypes, the loss, and the likely fix
    (torch's own message, under its traceback, names none of them)."""
    try:
        return loss_func(preds, *target)
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        if type(error) not in (RuntimeError, ValueError, IndexError, TypeError):
            raise  # a subclass may not take one message
        name = getattr(loss_func, "__name__", type(loss_func).__name__)
        fix = _likely_fix(name, preds, target)
        raise type(error)(
            f"the loss {name}(preds, target) failed on the model's output {describe(preds)} and "
            f"the target {describe(target[0] if len(target) == 1 else target)}"
            + (f": {fix}" if fix else "")
            + f". torch said: {error}"
        ) from error


def _likely_fix(name: str, preds: Any, target: tuple[Any, ...]) -> str | None:
    if len(target) != 1 or not isinstance(preds, torch.Tensor):
        return None
    (labels,) = target
    if not isinstance(labels, torch.Tensor):
        return None
    integer_labels = not labels.is_floating_point() and not labels.is_complex()
    if integer_labels and name in _REGRESSION_LOSSES:
        return (
            "a regression loss got integer class labels; for classes pass "
            "loss_func=F.cross_entropy, for regression give float targets of the output's shape"
        )
    if integer_labels and preds.ndim >= 2 and labels.numel():
        n_outputs, top = preds.shape[1], int(labels.max())
        if top >= n_outputs:
            return (
                f"the labels go up to {top} but the model has {n_outputs} outputs; give its head "
                f"{top + 1} outputs (vision_learner's n_out, or the last layer's out_features)"
            )
    if preds.shape != labels.shape and labels.is_floating_point():
        return (
            f"the output's shape {tuple(preds.shape)} and the target's {tuple(labels.shape)} "
            "differ; a head with as many outputs as the target has columns matches them"
        )
    return None


def computes_own_loss(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes a ``labels`` argument, as Hugging Face models do: such a
    model computes its own loss when given the target, so it needs no ``loss_func``."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "labels" in parameters


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
        model: The network; called as ``model(*inputs)`` on a tuple batch ``(inputs..., target)``
            and as ``model(**inputs)`` on a dict batch (see `forward_batch`).
        loss_func: ``loss_func(preds, target) -> scalar tensor``; ``None`` for a model that
            computes its own loss from ``labels=`` (a Hugging Face model): ``output.loss``.
        metrics: Functions ``(preds, targets) -> number``, computed on the whole validation set,
            or torchmetrics-like objects (``update``/``compute``/``reset``). ``preds`` are the
            output's ``.logits`` when it has them.
        optimizer: Returns the optimizer to train with.
    """

    def epoch_values(self, validates: bool) -> list[str]:
        """The names of what each epoch's row holds (what a stage may monitor): ``train_loss``,
        and with validation (``validates``) ``valid_loss`` and the metrics."""
        return ["train_loss", *(["valid_loss", *self.metric_names] if validates else [])]

    def __init__(
        self,
        model: nn.Module,
        loss_func: Callable[..., torch.Tensor] | None,
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
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        return self.model(*inputs, **kwargs)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._scalar_loss(forward_batch(self.model, batch, self.loss_func).loss)
        self.log("train_loss", loss, on_step=True, prog_bar=True)
        return loss

    def _scalar_loss(self, loss: Any) -> torch.Tensor:
        """``loss`` as a 0-d tensor if it is what backward needs (a tensor with one value, of
        any shape: ``(1,)`` too), else an error that says how to get one."""
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            return loss.reshape(())  # every reader (recorder, live line, logger) gets a scalar
        name = (
            "the model's own output.loss"
            if self.loss_func is None
            else getattr(self.loss_func, "__name__", type(self.loss_func).__name__)
        )
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"the loss ({name}) is a {type(loss).__name__} ({loss!r}), not a tensor; "
                "compute the loss with torch operations on the model's output so that it can be "
                "backpropagated."
            )
        raise ValueError(
            f"the loss ({name}) is a tensor of shape {tuple(loss.shape)}, one loss per "
            "item; the Learner needs one number per batch: reduce it (reduction='mean', or "
            ".mean() in your function)."
        )

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        step = forward_batch(self.model, batch, self.loss_func)
        self.log(
            "valid_loss",
            step.loss,
            on_epoch=True,
            prog_bar=True,
            batch_size=_batch_size(step.target),
            sync_dist=True,  # under DDP each rank sees a shard of the validation set
        )
        if not self.metrics:
            return
        if not step.target:
            raise TypeError(
                f"the metrics need a target, but this validation batch has none: "
                f"{describe(batch)}; put it under 'labels', or drop the metrics."
            )
        for metric in self.metrics:
            if is_stateful_metric(metric):
                metric.update(step.preds, *step.target)
        self._preds.append(step.preds.detach())
        self._targets.append(step.target[0].detach())

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
            if not is_number(value, tensor=True):
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
        # As in training; a batch may come without its target.
        parts = unpack_batch(batch, need_target=False)
        return output_preds(call_model(self.model, parts, raw=batch))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            raise RuntimeError("LearnerModule has no optimizer; it is trained through a Learner.")
        return self._optimizer()


def _batch_size(target: tuple[Any, ...]) -> int | None:
    # None (no target): Lightning infers it from the batch.
    first = target[0] if target else None
    return len(first) if hasattr(first, "__len__") else None


def make_module(
    model: Any, loss_func: Any, metrics: Any, optimizer: Callable[[], torch.optim.Optimizer]
) -> pl.LightningModule:
    """``model`` itself if it is a ``LightningModule``, else a `LearnerModule` around it.

    ``loss_func`` may be ``None`` for a model whose ``forward`` takes ``labels`` (a Hugging Face
    model): it computes its own loss.

    Raises:
        TypeError: ``model`` is not a module; a plain module comes without a callable
            ``loss_func`` and does not compute its own loss; a metric is not callable.
    """
    if isinstance(model, pl.LightningModule):
        if loss_func is not None or metrics:
            warnings.warn(
                "loss_func and metrics are ignored for a LightningModule: its training_step and "
                "validation_step compute and log them.",
                stacklevel=user_stacklevel(),
            )
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module or a LightningModule, got {type(model).__name__}."
        )
    if loss_func is None and not computes_own_loss(model):
        raise TypeError(
            f"a plain nn.Module ({type(model).__name__}) needs a loss_func, e.g. "
            "Learner(model, data, loss_func=F.cross_entropy); or pass a LightningModule."
        )
    if loss_func is not None and not callable(loss_func):
        raise TypeError(f"loss_func must be callable (preds, target) -> loss, got {loss_func!r}.")
    if metrics is None:
        metrics = []
    elif callable(metrics) or isinstance(metrics, nn.Module):  # one metric, not a list
        metrics = [metrics]
    metrics = list(metrics)
    for index, m in enumerate(metrics):
        if not callable(m) and not hasattr(m, "compute"):
            raise TypeError(f"metric {m!r} is not callable (preds, targets) -> number.")
        _check_metric_signature(m, index)
    return LearnerModule(model, loss_func, metrics, optimizer)


def _check_metric_signature(metric: Any, index: int) -> None:
    """A function metric is called ``metric(preds, targets)`` at each validation end: refuse one
    that cannot take those two arguments now, not after a whole epoch of training."""
    if not callable(metric) or is_stateful_metric(metric):
        return
    try:
        signature = inspect.signature(metric)
    except (TypeError, ValueError):  # a builtin without a signature: it will tell at its call
        return
    try:
        signature.bind(object(), object())
    except TypeError:
        name = metric_name(metric, index)
        raise TypeError(
            f"metric {name!r} has the signature {name}{signature}, but metrics are called as "
            "metric(preds, targets) on the whole validation set; wrap it, e.g. "
            f"metrics=lambda preds, targets: {name}(preds, targets, ...)."
        ) from None


@contextmanager
def training_with(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Make ``module`` train with ``optimizer`` in the fits run inside: its own
    ``configure_optimizers`` is shadowed by an instance attribute and restored afterwards (the
    class is never touched)."""
    own = module.__dict__.get("configure_optimizers")
    module.configure_optimizers = lambda: optimizer
    try:
        yield
    finally:
        if own is None:
            del module.configure_optimizers
        else:
            module.configure_optimizers = own
