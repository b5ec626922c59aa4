"""Tiny models and data for the tests: a few Linear layers, a BatchNorm, synthetic data; a
Learner over them; a script run in a fresh process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]


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


def quiet(path: Any) -> dict[str, Any]:
    """The Learner arguments every test run shares: files under ``path``, no logger, no
    progress bar."""
    return {"path": path, "logger": False, "enable_progress_bar": False}


def make_learner(
    path: Any,
    model: nn.Module | None = None,
    data: Any = None,
    loss_func: Any = F.cross_entropy,
    **kwargs: Any,
):
    """A quiet Learner (`quiet`), by default over `make_model` (three groups) and `make_loaders`;
    ``kwargs`` win (``splitter=None`` for a model of another shape). Every test builds its
    quiet Learners here."""
    from difflr import Learner

    options = {"splitter": three_groups, **quiet(path), **kwargs}
    return Learner(
        make_model() if model is None else model,
        make_loaders() if data is None else data,
        loss_func,
        **options,
    )


def make_trainer(**kwargs: Any):
    """A quiet Lightning ``Trainer`` of your own (no logger, checkpoints, bar or summary), for
    difflr's callbacks outside a Learner; ``kwargs`` win."""
    import lightning.pytorch as pl

    options = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **kwargs,
    }
    return pl.Trainer(**options)


def run_script(code: str, *args: Any, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh Python process from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=_default_sigint if os.name == "posix" else None,
    )


def _default_sigint() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` in the script even when the test run was started with
    SIGINT ignored (a shell's background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Crash(Callback):
    """Raise ``exc`` at (epoch, batch) of a fit: a run killed mid-way."""

    def __init__(self, epoch: int, batch: int, exc: type[BaseException] = RuntimeError):
        self.epoch, self.batch, self.exc = epoch, batch, exc

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise self.exc("simulated crash")
