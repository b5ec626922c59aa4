"""Tiny models and data for the tests: a few Linear layers, a BatchNorm, synthetic data."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_model() -> nn.Sequential:
    """Three layer groups: stem (Linear + BatchNorm), body, head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def three_groups(model: nn.Sequential) -> dict[str, nn.Module]:
    return {"stem": model[:3], "body": model[3:5], "head": model[5]}


def make_loaders(n: int = 96, batch_size: int = 16, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=32)
