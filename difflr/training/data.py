"""The data a Learner trains on: two loaders, a ``LightningDataModule``, or the module's own."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from difflr.utils.checks import user_stacklevel

__all__ = ["Data", "check_loader", "loader_length"]


def loader_length(loader: Any) -> int | None:
    """``len(loader)``, or ``None`` for a loader without a length (an ``IterableDataset``)."""
    try:
        return len(loader)
    except TypeError:
        return None


def check_loader(loader: Any, name: str) -> None:
    """Refuse what is not a loader, or a loader with no batches.

    Raises:
        TypeError: ``loader`` is not iterable (or is a tensor or an array).
        ValueError: ``loader`` has a length of 0.
    """
    if isinstance(loader, (str, bytes, torch.Tensor, np.ndarray)) or not hasattr(
        loader, "__iter__"
    ):
        raise TypeError(
            f"{name} must be a DataLoader (or an iterable of batches), got "
            f"{type(loader).__name__}; wrap a Dataset in torch.utils.data.DataLoader."
        )
    if loader_length(loader) == 0:
        raise ValueError(
            f"{name} is empty (0 batches); check the dataset's size, batch_size and drop_last."
        )


@dataclass(frozen=True)
class Data:
    """Where a Learner's batches come from: loaders, or a datamodule, or neither (the
    ``LightningModule``'s own ``*_dataloader`` methods)."""

    train_dl: Any = None
    valid_dl: Any = None
    datamodule: pl.LightningDataModule | None = None

    @classmethod
    def from_arg(cls, data: Any, has_own_loaders: bool) -> Data:
        """Read the Learner's ``data`` argument.

        Args:
            data: ``(train_dl, valid_dl)``, ``(train_dl,)``, a ``DataLoader``, a
                ``LightningDataModule`` or ``None``.
            has_own_loaders: Whether the model is a ``LightningModule`` (which may define its
                own loaders, so ``data=None`` is allowed).

        Raises:
            TypeError: ``data`` has none of those forms.
            ValueError: A loader is empty.
        """
        if isinstance(data, pl.LightningDataModule):
            return cls(datamodule=data)
        if data is None:
            if not has_own_loaders:
                raise TypeError(
                    "data is None, but a plain nn.Module has no dataloaders; pass "
                    "(train_dl, valid_dl) or a LightningDataModule."
                )
            return cls()
        if isinstance(data, (tuple, list)) and len(data) in (1, 2):
            train_dl, valid_dl = (data[0], None) if len(data) == 1 else data
            check_loader(train_dl, "the training loader (data[0])")
            if valid_dl is not None:
                check_loader(valid_dl, "the validation loader (data[1])")
            return cls(train_dl, valid_dl)
        if isinstance(data, torch.utils.data.DataLoader):
            check_loader(data, "data")
            return cls(data)
        raise TypeError(
            f"data must be (train_dl, valid_dl), a LightningDataModule or None; got "
            f"{type(data).__name__}"
            + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
            + "."
        )

    def warn_unused_metrics(self, metric_names: list[str], module_has_val_loader: bool) -> None:
        """Warn when metrics were given but nothing will compute them: a training loader alone
        (fastai's ``Learner`` would fail later; Lightning would silently skip validation)."""
        if not metric_names or self.valid_dl is not None or self.datamodule is not None:
            return
        if self.train_dl is None or module_has_val_loader:
            return
        warnings.warn(
            f"metrics {', '.join(metric_names)} will not be computed: data is a training loader "
            "only, so no validation runs. Pass data=(train_dl, valid_dl) to validate each epoch.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def fit_kwargs(self) -> dict[str, Any]:
        """The data arguments of ``Trainer.fit``."""
        if self.datamodule is not None:
            return {"datamodule": self.datamodule}
        if self.train_dl is not None:
            return {"train_dataloaders": self.train_dl, "val_dataloaders": self.valid_dl}
        return {}

    def train_loader(self, module: pl.LightningModule) -> Any:
        """The training loader, asking the datamodule or the module when there is no loader."""
        if self.train_dl is not None:
            return self.train_dl
        source = self.datamodule if self.datamodule is not None else module
        return source.train_dataloader()
