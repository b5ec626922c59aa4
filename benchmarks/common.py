"""Shared pieces of the benchmarks: data, models, param groups, timers and the interleaved runner.

Everything here is plain PyTorch / Lightning, written the way a user who does not use difflr
would write it, so that the hand-written contenders owe nothing to difflr.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import io
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]

#: The task of the issue: batch 64, discriminative one-cycle over 6 layer groups.
BATCH_SIZE = 64
LR_LO, LR_HI = 1e-5, 1e-3
#: fastai's one-cycle defaults, which ``Learner.fit_one_cycle`` uses.
PCT_START, DIV, DIV_FINAL = 0.25, 25.0, 1e5
MOMS = (0.95, 0.85, 0.95)
#: AdamW's default weight decay; biases and norm params get none (difflr's wd_bn_bias=False).
WEIGHT_DECAY = 0.01

Run = Callable[[], "dict[str, Any] | None"]
Prepare = Callable[[], Run]


@dataclass(frozen=True)
class Config:
    """Sizes of a run. The default is the full suite; ``quick_run()`` a smoke run of every path."""

    quick: bool = False
    epochs: int = 2  # fit_one_cycle(2, slice(1e-5, 1e-3))
    n_train: int | None = None  # None: all 1,438 training images (23 batches of 64)
    n_valid: int | None = None  # None: all 359 validation images
    fit_repeats: int = 7
    loggers: bool = True  # also compare each tool's default logger and checkpointing
    defaults_repeats: int = 3
    lr_find_iters: int = 100
    lr_find_repeats: int = 3
    suggestions: bool = True  # one untimed default sweep per tool, for the suggestions
    freeze_repeats: int = 3
    memory_steps: int = 8
    memory_repeats: int = 2
    micro_steps: int = 3000
    micro_repeats: int = 5
    tiny_epochs: int = 10
    tiny_repeats: int = 15

    @classmethod
    def quick_run(cls) -> Config:
        return cls(
            quick=True,
            n_train=256,
            n_valid=128,
            fit_repeats=2,
            loggers=True,
            defaults_repeats=1,
            lr_find_iters=12,
            lr_find_repeats=1,
            suggestions=False,
            freeze_repeats=1,
            memory_steps=2,
            memory_repeats=1,
            micro_steps=200,
            micro_repeats=2,
            tiny_epochs=2,
            tiny_repeats=2,
        )


# --------------------------------------------------------------------------------- environment
def quiet() -> None:
    """Silence the warnings and INFO lines every contender would print (equally for all)."""
    for pattern in (
        ".*does not have many workers.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",
        ".*`validation_step` but have no `val_dataloader`.*",
        ".*Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`.*",
        ".*The number of training batches .* is smaller than the logging interval.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*configure_optimizers is superseded.*",
        "lr_find recorded .* points.*",  # the 3-step warm-up sweeps
    ):
        warnings.filterwarnings("ignore", pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def swallow_stdout() -> Iterator[None]:
    """Keep the contenders' prints (difflr's epoch table, the progress bar Lightning's
    ``lr_find`` always shows) out of the benchmark's output."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def seed(value: int = 0) -> None:
    torch.manual_seed(value)
    np.random.seed(value)


def learner_off_switches() -> dict[str, Any]:
    """Learner arguments that turn off what the hand-written contenders do not do either:
    the progress bar, the logger and, where the Learner has it, the per-epoch checkpoint."""
    import inspect

    from difflr import Learner

    kwargs: dict[str, Any] = {"logger": False, "enable_progress_bar": False}
    if "checkpoint" in inspect.signature(Learner).parameters:
        kwargs["checkpoint"] = False
    return kwargs


# --------------------------------------------------------------------------------- data
@functools.cache
def digits(size: int = 32, channels: int = 3) -> tuple[TensorDataset, TensorDataset]:
    """UCI handwritten digits (1,797 images of 8x8, bundled with scikit-learn, no download),
    upsampled bilinearly to ``size`` x ``size``, standardised; 80/20 split with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    if channels > 1:  # grey images into an RGB backbone, as with pretrained ImageNet weights
        x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_valid = len(x) // 5
    valid, train = order[:n_valid], order[n_valid:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[valid], y[valid])


def subset(ds: TensorDataset, n: int | None) -> TensorDataset:
    return ds if n is None else TensorDataset(*(t[:n] for t in ds.tensors))


def loaders(
    train: TensorDataset, valid: TensorDataset | None, seed_value: int = 0
) -> tuple[DataLoader, DataLoader | None]:
    """Fresh loaders; the training order depends only on ``seed_value`` (same for every contender)."""
    train_dl = DataLoader(
        train,
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed_value),
    )
    valid_dl = None if valid is None else DataLoader(valid, batch_size=BATCH_SIZE * 2)
    return train_dl, valid_dl


# --------------------------------------------------------------------------------- models
def resnet18(seed_value: int = 0) -> nn.Module:
    """torchvision's ResNet-18, random weights (``weights=None``), a 10-class head."""
    import torchvision

    seed(seed_value)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def resnet_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The 6 layer groups a user writes by hand: stem, layer1..layer4, head."""
    stem = [*model.conv1.parameters(), *model.bn1.parameters()]
    stages = [list(getattr(model, f"layer{i}").parameters()) for i in range(1, 5)]
    return [stem, *stages, list(model.fc.parameters())]


class TinyCNN(nn.Sequential):
    """A ~13k-parameter CNN on the 8x8 digits, where framework overhead dominates a step."""

    def __init__(self) -> None:
        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
            )

        super().__init__(
            block(1, 16, 1),  # 8x8
            block(16, 32, 2),  # 4x4
            block(32, 28, 2),  # 2x2
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(28, 10)),
        )


def tiny_cnn(seed_value: int = 0) -> TinyCNN:
    seed(seed_value)
    return TinyCNN()


def tiny_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    return [list(m.parameters()) for m in model]


def tiny_splitter(model: nn.Module) -> dict[str, nn.Module]:
    return {"block1": model[0], "block2": model[1], "block3": model[2], "head": model[3]}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------- optimizers
def geometric_lrs(lo: float, hi: float, n: int) -> list[float]:
    """``slice(lo, hi)`` over ``n`` groups, fastai's way: ``lo * (hi/lo) ** (i/(n-1))``."""
    return [hi] if n == 1 else [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def torch_param_groups(
    groups: Sequence[Sequence[nn.Parameter]], lrs: Sequence[float], wd: float = WEIGHT_DECAY
) -> tuple[list[dict[str, Any]], list[float]]:
    """Two torch param groups per layer group (weights with decay; biases and norm params, all
    1-D, without), as difflr builds them. Returns the groups and each one's LR."""
    param_groups, group_lrs = [], []
    for group, lr in zip(groups, lrs, strict=True):
        decay = [p for p in group if p.ndim > 1]
        plain = [p for p in group if p.ndim <= 1]
        for params, weight_decay in ((decay, wd), (plain, 0.0)):
            if params:
                param_groups.append({"params": params, "lr": lr, "weight_decay": weight_decay})
                group_lrs.append(lr)
    return param_groups, group_lrs


def adamw_one_cycle(
    groups: Sequence[Sequence[nn.Parameter]], lrs: Sequence[float], total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW over the layer groups and torch's OneCycleLR set up as fastai's one-cycle:
    warm-up 25 %, ``lr_max/25`` to ``lr_max`` to ``lr_max/1e5``, cosine, momentum (beta1)
    0.95 -> 0.85 -> 0.95."""
    param_groups, group_lrs = torch_param_groups(groups, lrs)
    optimizer = torch.optim.AdamW(param_groups, lr=group_lrs[-1])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=group_lrs,
        total_steps=total_steps,
        pct_start=PCT_START,
        anneal_strategy="cos",
        cycle_momentum=True,
        base_momentum=MOMS[1],
        max_momentum=MOMS[0],
        div_factor=DIV,
        final_div_factor=DIV_FINAL / DIV,  # torch divides the initial LR, fastai lr_max
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------------- timers
#: The two clocks every measurement reads. ``cpu`` is the CPU time of the whole process (all its
#: threads, CLOCK_PROCESS_CPUTIME_ID): the work a contender does, which other processes on a
#: shared machine barely change. ``wall`` is elapsed time, which they do.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def now() -> tuple[float, float]:
    """``(cpu, wall)`` readings, in seconds."""
    return time.process_time(), time.perf_counter()


class StepTimer(Callback):
    """Both clocks at every ``on_train_batch_start``, and the length of every training batch
    (``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.starts: list[list[tuple[float, float]]] = []
        self.batch: dict[str, list[float]] = {"cpu": [], "wall": []}
        self._t0 = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = now()
        self.starts[-1].append(self._t0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        cpu, wall = now()
        self.batch["cpu"].append(cpu - self._t0[0])
        self.batch["wall"].append(wall - self._t0[1])

    def step(self, clock: str = "cpu", skip: int = 2) -> float:
        """Median length of a training batch, the first ``skip`` left out."""
        values = self.batch[clock]
        return statistics.median(values[min(skip, len(values) - 1) :])

    def cycle(self, clock: str = "cpu", skip: int = 2) -> float:
        """Median time from one batch's start to the next (steady state, epoch ends excluded)."""
        return cycle_time(self.starts, clock, skip)


def cycle_time(
    starts: Sequence[Sequence[tuple[float, float]]], clock: str = "cpu", skip: int = 2
) -> float:
    i = 0 if clock == "cpu" else 1
    diffs = [b[i] - a[i] for epoch in starts for a, b in zip(epoch[skip:], epoch[skip + 1 :])]
    return statistics.median(diffs) if diffs else math.nan


@dataclass
class Comparison:
    """Times of contenders run interleaved: ``times[clock][name][repeat]`` in seconds."""

    names: list[str]
    times: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    extras: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def median(self, name: str, clock: str = "cpu") -> float:
        return statistics.median(self.times[clock][name])

    def ratio(self, name: str, baseline: str, clock: str = "cpu") -> dict[str, float]:
        """``name`` over ``baseline``: ratio of the medians, and the median and range of the
        per-repeat ratios (each repeat runs the two back to back)."""
        paired = [a / b for a, b in zip(self.times[clock][name], self.times[clock][baseline])]
        return {
            "ratio_of_medians": self.median(name, clock) / self.median(baseline, clock),
            "paired_median": statistics.median(paired),
            "paired_min": min(paired),
            "paired_max": max(paired),
        }

    def ratios(self, name: str, baseline: str) -> dict[str, dict[str, float]]:
        return {clock: self.ratio(name, baseline, clock) for clock in CLOCKS}

    def extra(self, name: str, key: str) -> float:
        """Median over repeats of a number a contender reported."""
        values = [e[key] for e in self.extras[name] if e and key in e]
        return statistics.median(values) if values else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "times_s": self.times,
            "median_s": {clock: {n: self.median(n, clock) for n in self.names} for clock in CLOCKS},
            "extras": self.extras,
        }


def interleave(
    contenders: dict[str, Prepare], repeats: int, log: Callable[[str], None] = print
) -> Comparison:
    """Run every contender once per repeat, back to back, rotating the order each repeat so that
    no contender always runs first. ``prepare()`` (untimed) builds the model and data and returns
    ``run``, which is timed on both clocks and may return numbers to keep."""
    names = list(contenders)
    result = Comparison(names, {c: {n: [] for n in names} for c in CLOCKS}, {n: [] for n in names})
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            run = contenders[name]()
            gc.collect()
            with swallow_stdout():
                cpu0, wall0 = now()
                extra = run()
                cpu1, wall1 = now()
            result.times["cpu"][name].append(cpu1 - cpu0)
            result.times["wall"][name].append(wall1 - wall0)
            result.extras[name].append(extra or {})
            del run
            log(
                f"    repeat {r + 1}/{repeats}  {name:<32s} cpu {cpu1 - cpu0:7.3f} s"
                f"   wall {wall1 - wall0:7.3f} s"
            )
    return result


# --------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted changes" if dirty else "")


def machine_info() -> dict[str, Any]:
    import lightning
    import torchvision

    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "difflr_revision": git_revision(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info
