"""Metrics for the Learner's validation pass: functions ``(preds, targets) -> number``."""

from __future__ import annotations

import torch

__all__ = ["accuracy", "error_rate"]


def accuracy(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max class equals the target (targets as class indices).

    Examples:
        >>> float(accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])))
        0.5
    """
    return (preds.argmax(dim=-1) == targets).float().mean()


def error_rate(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - accuracy``."""
    return 1 - accuracy(preds, targets)
