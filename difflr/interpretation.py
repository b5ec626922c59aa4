"""After-fit analysis: which items a model gets most wrong, and which classes it confuses.

fastai's ``Interpretation`` and ``ClassificationInterpretation``, with the same names and
return shapes, built on `difflr.predictions.collect_predictions` (``Trainer.predict``: every
item once, in dataset order, gathered under DDP). The figures are matplotlib ``Figure`` objects
made without pyplot, as in `difflr.plotting`: returned from a notebook cell, one shows inline
once.

Examples:
    >>> interp = ClassificationInterpretation.from_learner(learn)  # doctest: +SKIP
    >>> interp.most_confused(min_val=2)  # doctest: +SKIP
    [('seven', 'one', 4), ('eight', 'three', 2)]
    >>> interp.plot_confusion_matrix()  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from typing_extensions import Self

from difflr.plotting import new_figure, shown
from difflr.predictions import collect_predictions, indexed, read_loader
from difflr.training.activations import Activation, activate, check_act
from difflr.training.loaders import check_vocab_fits
from difflr.training.module import unpack_batch
from difflr.training.runner import Runner
from difflr.utils.checks import check_int
from difflr.utils.nested import take

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ClassificationInterpretation", "Interpretation"]

#: Inches per image in `Interpretation.plot_top_losses` (width, height with its caption).
_IMAGE_SIZE = (2.2, 2.6)
#: Above this many classes the confusion matrix has no numbers in its cells (unreadable).
_MAX_CLASSES_WITH_TEXT = 30


class _LearnerLike(Protocol):
    """What ``from_learner`` needs of a Learner (the Learner is not imported here)."""

    runner: Runner

    @property
    def vocab(self) -> list[Any] | None: ...


class Interpretation:
    """Each item's loss on a dataset, next to the model's outputs and the targets, in dataset
    order: for any model with a loss function (classification, regression, multi-label).

    Build it with `from_learner`. The inputs of the items shown by `plot_top_losses` are read
    back from the loader's dataset when needed, so only outputs, targets and losses are held.

    Args:
        preds: The model's outputs after the activation, one row per item.
        targs: The targets, one per item (``None`` for none).
        losses: Each item's loss, shape ``(n_items,)``.
        dl: The loader the items came from, in dataset order (for their inputs).
        inputs: The inputs themselves, when the loader cannot give items by index.
        vocab: Class names, index ``i`` → ``vocab[i]``.

    Attributes:
        preds: As given (`ClassificationInterpretation`: probabilities).
        targs: As given.
        losses: As given.

    Raises:
        ValueError: ``losses`` is not a non-empty 1-D tensor (one number per item).
    """

    def __init__(
        self,
        preds: Any,
        targs: Any,
        losses: torch.Tensor,
        *,
        dl: Any = None,
        inputs: Any = None,
        vocab: Sequence[Any] | None = None,
    ) -> None:
        losses = torch.as_tensor(losses)
        if losses.ndim != 1 or len(losses) == 0:
            raise ValueError(
                f"losses must be one number per item, shape (n_items,); got shape "
                f"{tuple(losses.shape)}."
            )
        self.preds, self.targs, self.losses = preds, targs, losses
        self.dl, self.inputs = dl, inputs
        self.vocab = None if vocab is None else list(vocab)

    @classmethod
    def from_learner(
        cls, learn: _LearnerLike, dl: Any = None, act: Activation | None = None
    ) -> Self:
        """Predict every item of the validation set (or ``dl``) with the Learner's model and
        compute each one's loss (``Trainer.predict``; see ``Learner.get_preds``).

        Args:
            learn: A trained ``Learner``.
            dl: A loader; ``None`` for the validation set. A shuffling or ``drop_last``
                ``DataLoader`` is rebuilt without either.
            act: Applied to the outputs; ``None`` for the rule of ``Learner.get_preds``.

        Raises:
            ValueError: No validation set and no ``dl``; an empty loader; (for
                `ClassificationInterpretation`) outputs that are not class scores.
            TypeError: ``act`` is not callable; the model has no loss function (a
                ``LightningModule`` without ``loss_func``).
        """
        check_act(act)
        runner = learn.runner
        loader = read_loader(runner, dl, cls.__name__)
        # Inputs are read back by index when the dataset allows it; otherwise kept now.
        found = collect_predictions(runner, loader, with_input=not indexed(loader), with_loss=True)
        return cls(
            activate(found.preds, act, runner.module),
            found.targets,
            found.losses,
            dl=loader,
            inputs=found.inputs,
            vocab=learn.vocab,
        )

    def top_losses(self, k: int | None = None, largest: bool = True) -> Any:
        """The ``k`` largest (or smallest) losses and the items they belong to.

        Args:
            k: How many (all items when ``None``; at most the number of items).
            largest: ``False`` for the smallest losses.

        Returns:
            ``torch.return_types.topk``: ``(values, indices)``, indices into the dataset.
        """
        n = len(self.losses)
        k = n if k is None else min(check_int(k, "k", 1, what="a number of items"), n)
        return self.losses.topk(k, largest=largest)

    def plot_top_losses(self, k: int, largest: bool = True) -> Figure:
        """The ``k`` items with the largest losses: their images (inputs of shape
        ``(C, H, W)`` with 1, 3 or 4 channels, each rescaled to [0, 1] for display) with a
        caption each, or else a bar chart of their losses with the captions as labels.

        Args:
            k: How many items (at most the number of items).
            largest: ``False`` for the smallest losses.

        Returns:
            The figure: ``k`` image axes in a grid (captions as their titles), or one axes of
            ``k`` horizontal bars, the largest loss on top.
        """
        values, indices = self.top_losses(k, largest)
        captions = [self._caption(int(i)) for i in indices]
        images = self._images(indices.numpy())
        if images is None:
            labels = [f"item {int(i)}: {c}" for i, c in zip(indices, captions)]
            return _bar_figure(values.numpy(), labels, self._header())
        return _image_grid(images, captions, self._header())

    # ------------------------------------------------------------------------- captions
    def _header(self) -> str:
        return "loss" if self.targs is None else "target / loss"

    def _caption(self, i: int) -> str:
        loss = f"{float(self.losses[i]):.2f}"
        target = None if self.targs is None else take(self.targs, i)
        if isinstance(target, (tuple, list)) and target:
            target = target[0]  # several targets: the first
        if isinstance(target, torch.Tensor) and target.numel() == 1:
            return f"{target.item():.3g} / {loss}"
        return loss

    # ------------------------------------------------------------------------- inputs
    def _images(self, indices: np.ndarray) -> list[np.ndarray] | None:
        """The items' inputs as images, or ``None`` when they are not images or cannot be
        read."""
        inputs = self._inputs(indices)
        if inputs is None:
            return None
        images = [_as_image(x) for x in inputs]
        return None if any(image is None for image in images) else images

    def _inputs(self, indices: np.ndarray) -> list[Any] | None:
        if self.inputs is not None:
            return [take(_first(self.inputs), int(i)) for i in indices]
        if not indexed(self.dl):
            return None
        # Through the loader's collate_fn, so that an item is what the model was given.
        batch = self.dl.collate_fn([self.dl.dataset[int(i)] for i in indices])
        first = _first(unpack_batch(batch, need_target=False).inputs)
        return [take(first, j) for j in range(len(indices))]


class ClassificationInterpretation(Interpretation):
    """`Interpretation` of a classifier: the confusion matrix, the most confused pairs of
    classes, and the worst items with their predicted and actual classes.

    Args:
        preds: Class scores, shape ``(n_items, n_classes)``: probabilities (rows of
            non-negative numbers summing to 1) or else logits, turned into probabilities with a
            softmax.
        targs: Class indices, shape ``(n_items,)``, integers in ``[0, n_classes)``.
        losses: Each item's loss, shape ``(n_items,)``.
        dl: The loader the items came from (see `Interpretation`).
        inputs: The inputs, when the loader cannot give items by index.
        vocab: Class names, index ``i`` → ``vocab[i]``; ``None`` shows indices.

    Attributes:
        preds: The class probabilities.
        decoded: The predicted class of each item, shape ``(n_items,)``.

    Raises:
        ValueError: The outputs are not class scores or the targets not class indices (a
            regression, multi-label or segmentation model: use `Interpretation`), or the vocab
            does not have one name per class.
    """

    def __init__(
        self,
        preds: Any,
        targs: Any,
        losses: torch.Tensor,
        *,
        dl: Any = None,
        inputs: Any = None,
        vocab: Sequence[Any] | None = None,
    ) -> None:
        _check_classification(preds, targs)
        super().__init__(preds, targs, losses, dl=dl, inputs=inputs, vocab=vocab)
        check_vocab_fits(self.vocab, preds.shape[1])
        self.preds = preds.float() if _are_probabilities(preds) else preds.float().softmax(1)
        self.decoded = self.preds.argmax(dim=1)

    @property
    def n_classes(self) -> int:
        """The number of classes (columns of ``preds``)."""
        return self.preds.shape[1]

    def _names(self) -> list[Any]:
        return list(range(self.n_classes)) if self.vocab is None else self.vocab

    def confusion_matrix(self) -> np.ndarray:
        """How many items of each actual class (rows) got each predicted class (columns).

        Returns:
            An ``int64`` array of shape ``(n_classes, n_classes)``; entry ``[i, j]`` counts the
            items of class ``i`` predicted as ``j``.
        """
        n = self.n_classes
        pairs = self.targs.long().numpy() * n + self.decoded.numpy()
        return np.bincount(pairs, minlength=n * n).reshape(n, n)

    def most_confused(self, min_val: int = 1) -> list[tuple[Any, Any, int]]:
        """The off-diagonal cells of the confusion matrix with at least ``min_val`` items,
        most frequent first.

        Args:
            min_val: The smallest count listed (>= 0).

        Returns:
            ``[(actual, predicted, count), ...]``, class names from the vocab (else indices),
            sorted by count, largest first (ties in class order).
        """
        min_val = check_int(min_val, "min_val", 0, what="a number of items")
        cm, names = self.confusion_matrix(), self._names()
        cells = [
            (names[i], names[j], int(cm[i, j]))
            for i, j in zip(*np.nonzero(cm >= min_val))
            if i != j
        ]
        return sorted(cells, key=lambda cell: cell[2], reverse=True)

    def plot_confusion_matrix(
        self,
        normalize: bool = False,
        title: str = "Confusion matrix",
        cmap: str = "Blues",
        norm_dec: int = 2,
    ) -> Figure:
        """Draw the confusion matrix: actual classes down, predicted classes across, the count
        (or the fraction of the actual class) in each cell.

        Args:
            normalize: Show each row as fractions of its class's items (an empty row is NaN,
                drawn blank and written "—").
            title: The axes' title.
            cmap: A matplotlib colormap name.
            norm_dec: Decimals of the fractions.

        Returns:
            The figure; its image holds the matrix shown (counts, or fractions).
        """
        cm = self.confusion_matrix().astype(np.float64)
        if normalize:
            with np.errstate(invalid="ignore", divide="ignore"):
                cm = cm / cm.sum(axis=1, keepdims=True)
        n, names = self.n_classes, [str(name) for name in self._names()]
        side = max(4.0, 0.45 * n + 2.0)
        fig = new_figure((side, side))
        ax = fig.subplots()
        image = ax.imshow(cm, cmap=cmap, interpolation="nearest")
        ax.set_title(title)
        rotate = max(len(name) for name in names) > 3
        ax.set_xticks(range(n), labels=names, rotation=90 if rotate else 0)
        ax.set_yticks(range(n), labels=names)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("Actual")
        if n <= _MAX_CLASSES_WITH_TEXT:
            threshold = np.nanmax(cm) / 2 if np.isfinite(cm).any() else 0.0
            for i in range(n):
                for j in range(n):
                    value = cm[i, j]
                    if math.isnan(value):
                        text = "—"
                    else:
                        text = f"{value:.{norm_dec}f}" if normalize else str(int(value))
                    color = "white" if value > threshold else "black"
                    ax.text(j, i, text, ha="center", va="center", color=color)
        fig.colorbar(image, ax=ax, shrink=0.8)
        return shown(fig)

    def _header(self) -> str:
        return "prediction / actual / loss / probability"

    def _caption(self, i: int) -> str:
        names = self._names()
        predicted = int(self.decoded[i])
        actual = int(self.targs[i])
        probability = float(self.preds[i, predicted])
        loss = float(self.losses[i])
        return f"{names[predicted]} / {names[actual]}\n{loss:.2f} / {probability:.2f}"


# ----------------------------------------------------------------------------- helpers
def _first(inputs: Any) -> Any:
    """The first of several inputs (a tuple of them), else the inputs: what an image is read
    from."""
    return inputs[0] if isinstance(inputs, (tuple, list)) else inputs


def _check_classification(preds: Any, targs: Any) -> None:
    n_classes = preds.shape[1] if isinstance(preds, torch.Tensor) and preds.ndim == 2 else None
    integer_targets = (
        isinstance(targs, torch.Tensor)
        and targs.ndim == 1
        and not targs.is_floating_point()
        and not targs.is_complex()
        and targs.dtype != torch.bool
    )
    if n_classes is None or n_classes < 2 or not integer_targets:
        got_preds = (
            f"outputs of shape {tuple(preds.shape)}"
            if isinstance(preds, torch.Tensor)
            else f"outputs of type {type(preds).__name__}"
        )
        got_targs = (
            f"targets of shape {tuple(targs.shape)} ({str(targs.dtype).removeprefix('torch.')})"
            if isinstance(targs, torch.Tensor)
            else "no targets"
            if targs is None
            else f"targets of type {type(targs).__name__}"
        )
        raise ValueError(
            "ClassificationInterpretation needs class scores of shape (n_items, n_classes >= 2) "
            f"and integer class targets of shape (n_items,); got {got_preds} and {got_targs}. "
            "This looks like a regression, multi-label or segmentation model: use "
            "Interpretation.from_learner(learn) for its top_losses and plot_top_losses."
        )
    if len(targs) != len(preds):
        raise ValueError(f"{len(preds)} rows of class scores but {len(targs)} targets.")
    if len(targs) and (int(targs.min()) < 0 or int(targs.max()) >= n_classes):
        raise ValueError(
            f"targets must be class indices in [0, {n_classes}); got values from "
            f"{int(targs.min())} to {int(targs.max())}."
        )


def _are_probabilities(preds: torch.Tensor) -> bool:
    rows = preds.double().sum(dim=1)
    return bool((preds >= 0).all() and torch.allclose(rows, torch.ones_like(rows), atol=1e-4))


def _as_image(x: Any) -> np.ndarray | None:
    """An input of shape ``(C, H, W)`` with 1, 3 or 4 channels as an ``(H, W[, C])`` array in
    [0, 1] (min-max rescaled: normalised inputs have no fixed range); ``None`` otherwise."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        return None
    if min(x.shape[1:]) < 2:
        return None
    array = x.detach().cpu().double().numpy().transpose(1, 2, 0)
    low, high = array.min(), array.max()
    array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return array[..., 0] if array.shape[2] == 1 else array


def _image_grid(images: list[np.ndarray], captions: list[str], header: str) -> Figure:
    n = len(images)
    rows = math.ceil(math.sqrt(n))
    cols = math.ceil(n / rows)
    fig = new_figure((_IMAGE_SIZE[0] * cols, _IMAGE_SIZE[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, image, caption in zip(axes, images, captions):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(header)
    return shown(fig)


def _bar_figure(losses: np.ndarray, captions: list[str], header: str) -> Figure:
    fig = new_figure((6.0, max(2.0, 0.35 * len(losses) + 1.0)))
    ax = fig.subplots()
    positions = np.arange(len(losses))
    ax.barh(positions, losses)
    ax.set_yticks(positions, labels=[caption.replace("\n", " / ") for caption in captions])
    ax.invert_yaxis()  # the first (largest) on top
    ax.set_xlabel("loss")
    ax.set_title(header)
    return shown(fig)
