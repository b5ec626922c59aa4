"""Loaders and class names for the after-fit analysis.

A loader that visits every item once, in order (`sequential_loader`), the validation set
wherever it comes from (a loader, a ``LightningDataModule`` or the module's own:
`validation_source`, `validation_loader`), and the class names a dataset carries (`find_vocab`,
checked by `check_vocab` and `check_vocab_fits`)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from difflr.training.data import Data, check_loader

__all__ = [
    "check_vocab",
    "check_vocab_fits",
    "class_name",
    "defines_hook",
    "find_vocab",
    "sequential_loader",
    "validation_loader",
    "validation_source",
]

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


def defines_hook(obj: Any, hook: str, base: type) -> bool:
    """Whether ``obj`` has its own ``hook`` (a method of its class or an attribute), not
    ``base``'s placeholder."""
    return hook in vars(obj) or getattr(type(obj), hook, None) is not getattr(base, hook)


def _no_validation_set(what: str, where: str) -> ValueError:
    return ValueError(
        f"{what} has no data to read: {where}. Pass dl= (a DataLoader of (x, y) batches), or "
        "give the Learner a validation set: Learner(model, (train_dl, valid_dl), ...)."
    )


def validation_source(data: Data, module: pl.LightningModule, what: str) -> Any:
    """Where the validation set comes from: a loader, the datamodule, or the module itself."""
    if data.valid_dl is not None:
        return data.valid_dl
    if data.datamodule is not None:
        if not defines_hook(data.datamodule, "val_dataloader", pl.LightningDataModule):
            raise _no_validation_set(
                what, f"the datamodule {type(data.datamodule).__name__} has no val_dataloader()"
            )
        return data.datamodule
    if defines_hook(module, "val_dataloader", pl.LightningModule):
        return module  # Lightning's fit reads it too when no validation loader is given
    raise _no_validation_set(what, "the Learner was given no validation loader")


def validation_loader(data: Data, module: pl.LightningModule, what: str) -> Any:
    """The validation loader itself: the Learner's, or the datamodule's (after its
    ``setup("validate")``, as ``Trainer.validate`` would call it), or the module's own.

    Raises:
        ValueError: There is no validation set, or several validation loaders.
    """
    source = validation_source(data, module, what)
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


def class_name(vocab: Sequence[Any] | None, index: int) -> Any:
    return index if vocab is None else vocab[index]


def check_vocab_fits(vocab: Sequence[Any] | None, n_classes: int) -> None:
    if vocab is not None and len(vocab) != n_classes:
        raise ValueError(
            f"learn.vocab has {len(vocab)} names but the model gives {n_classes} class scores; "
            f"set learn.vocab to {n_classes} names (or None for indices)."
        )
