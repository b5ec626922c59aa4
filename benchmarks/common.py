"""Shared pieces of the benchmarks: data, models, param groups, clocks and the interleaved runner.

The hand-written contenders are built from this module and ``contenders.py`` only, in plain
PyTorch and Lightning, so that they owe nothing to difflr.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import io
import itertools
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]

BATCH_SIZE = 64
#: ``fit_one_cycle(2, slice(1e-5, 1e-3))`` over ResNet-18's 6 layer groups.
LR_LO, LR_HI = 1e-5, 1e-3
#: fastai's one-cycle defaults, which ``Learner.fit_one_cycle`` uses.
PCT_START, DIV, DIV_FINAL = 0.25, 25.0, 1e5
MOMS = (0.95, 0.85, 0.95)
#: AdamW's default weight decay; biases and norm params get none (difflr's wd_bn_bias=False).
WEIGHT_DECAY = 0.01

Run = Callable[[], "dict[str, Any]"]
Prepare = Callable[[], Run]


@dataclass(frozen=True)
class Config:
    """Sizes of a run: the full suite by default, ``quick_run()`` a smoke run of every path."""

    epochs: int = 2
    n_train: int | None = None  # None: all 1,438 training images (23 batches of 64)
    n_valid: int | None = None  # None: all 359 validation images
    fit_repeats: int = 9
    lr_find_iters: int = 100
    lr_find_repeats: int = 5  # 3 left a first slow repeat deciding the median
    freeze_train: int = 256
    optim_steps: int = 10
    optim_repeats: int = 5
    tiny_epochs: int = 10
    tiny_repeats: int = 15

    @classmethod
    def quick_run(cls) -> Config:
        # 4 batches an epoch: OneCycleLR needs at least 8 steps a fit, so keep epochs >= 2.
        return cls(
            n_train=256,
            n_valid=128,
            fit_repeats=2,
            lr_find_iters=12,
            lr_find_repeats=1,
            freeze_train=128,
            optim_steps=2,
            optim_repeats=1,
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
        "lr_find recorded .* points.*",  # the short warm-up sweeps
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


#: Learner arguments that turn off what the hand-written contenders do not do either.
LEARNER_OFF = {"logger": False, "checkpoint": False, "enable_progress_bar": False}


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
    train: TensorDataset, valid: TensorDataset | None
) -> tuple[DataLoader, DataLoader | None]:
    """Fresh loaders; the training order is the same for every contender."""
    generator = torch.Generator().manual_seed(0)
    train_dl = DataLoader(train, batch_size=BATCH_SIZE, shuffle=True, generator=generator)
    valid_dl = None if valid is None else DataLoader(valid, batch_size=BATCH_SIZE * 2)
    return train_dl, valid_dl


def resnet_data(cfg: Config) -> tuple[DataLoader, DataLoader | None]:
    train, valid = digits(32)
    return loaders(subset(train, cfg.n_train), subset(valid, cfg.n_valid))


def tiny_data(cfg: Config) -> tuple[DataLoader, None]:
    return loaders(subset(digits(8, channels=1)[0], cfg.n_train), None)


# --------------------------------------------------------------------------------- models
def resnet18() -> nn.Module:
    """torchvision's ResNet-18, random weights (``weights=None``), a 10-class head."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def resnet_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The 6 layer groups a user writes by hand: stem, layer1..layer4, head."""
    stem = [*model.conv1.parameters(), *model.bn1.parameters()]
    stages = [list(getattr(model, f"layer{i}").parameters()) for i in range(1, 5)]
    return [stem, *stages, list(model.fc.parameters())]


def tiny_cnn() -> nn.Sequential:
    """A ~13k-parameter CNN on the 8x8 digits, where framework overhead dominates a step;
    its 4 children are its layer groups."""

    def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU())

    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(28, 10))
    return nn.Sequential(block(1, 16, 1), block(16, 32, 2), block(32, 28, 2), head)


def tiny_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    return [list(child.parameters()) for child in model]


# --------------------------------------------------------------------------------- optimizers
def geometric_lrs(lo: float, hi: float, n: int) -> list[float]:
    """``slice(lo, hi)`` over ``n`` groups, fastai's way: ``lo * (hi/lo) ** (i/(n-1))``."""
    return [hi] if n == 1 else [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def torch_param_groups(
    groups: Sequence[Sequence[nn.Parameter]], lrs: Sequence[float]
) -> list[dict[str, Any]]:
    """Two torch param groups per layer group (weights with decay; biases and norm params, all
    1-D, without), as difflr builds them."""
    param_groups = []
    for group, lr in zip(groups, lrs, strict=True):
        decay = [p for p in group if p.ndim > 1]
        plain = [p for p in group if p.ndim <= 1]
        for params, weight_decay in ((decay, WEIGHT_DECAY), (plain, 0.0)):
            if params:
                param_groups.append({"params": params, "lr": lr, "weight_decay": weight_decay})
    return param_groups


def adamw(
    groups: Sequence[Sequence[nn.Parameter]], lrs: Sequence[float], opt_kwargs: dict[str, Any]
) -> torch.optim.AdamW:
    return torch.optim.AdamW(torch_param_groups(groups, lrs), lr=lrs[-1], **opt_kwargs)


def fastai_one_cycle(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's OneCycleLR set up as fastai's one-cycle, peaking at each group's LR: warm-up
    25 %, ``lr_max/25`` to ``lr_max`` to ``lr_max/1e5``, cosine, momentum (beta1)
    0.95 -> 0.85 -> 0.95."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=PCT_START,
        base_momentum=MOMS[1],
        max_momentum=MOMS[0],
        div_factor=DIV,
        final_div_factor=DIV_FINAL / DIV,  # torch divides the initial LR, fastai lr_max
    )


def implementation(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Which of torch's implementations ``optimizer.step()`` runs, with the flags it read.
    ``foreach=None`` (torch's default) means the single-tensor loop for CPU tensors."""
    fused, foreach = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
    name = "fused" if fused else "foreach" if foreach else "single-tensor"
    return {"optimizer": type(optimizer).__name__, "fused": fused, "foreach": foreach, "name": name}


# --------------------------------------------------------------------------------- measuring
def now() -> tuple[float, float]:
    """``(cpu, wall)`` in seconds. CPU time is that of the whole process (all its threads): the
    work a contender does, which other jobs on a shared machine barely change; wall time is
    elapsed time, which they do."""
    return time.process_time(), time.perf_counter()


def cycle_ms(starts: Sequence[Sequence[float]]) -> float:
    """Median CPU time in ms from one batch's start to the next: the steady-state training
    step, epoch ends and the first two batches of an epoch left out."""
    return 1e3 * statistics.median(b - a for ep in starts for a, b in itertools.pairwise(ep[2:]))


class StepTimer(Callback):
    """CPU time at every ``on_train_batch_start``, one list per epoch."""

    def __init__(self) -> None:
        self.starts: list[list[float]] = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.starts.append([])

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
        self.starts[-1].append(time.process_time())


def interleave(
    contenders: dict[str, Prepare], repeats: int, log: Callable[[str], None] = print
) -> dict[str, list[dict[str, Any]]]:
    """Run every contender once per repeat, back to back, rotating the order each repeat so that
    none always runs first. ``prepare()`` (untimed) builds model, data and Learner or module and
    returns ``run``, which is timed on both clocks and returns numbers to keep; batch start
    times (``"starts"``) become the steady-state step and the fixed cost of the fit (Trainer
    construction, setup, epoch ends, teardown: what is not in the steady-state steps)."""
    names = list(contenders)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = contenders[name]()
            gc.collect()
            with swallow_stdout():
                cpu0, wall0 = now()
                record = run()
                cpu1, wall1 = now()
            record |= {"cpu_s": cpu1 - cpu0, "wall_s": wall1 - wall0}
            if "starts" in record:
                starts = record.pop("starts")
                record["n_steps"] = sum(map(len, starts))
                record["step_cpu_ms"] = cycle_ms(starts)
                record["fixed_cpu_ms"] = (
                    1e3 * record["cpu_s"] - record["n_steps"] * record["step_cpu_ms"]
                )
            record["cpu_ms_per_step"] = 1e3 * record["cpu_s"] / record["n_steps"]
            runs[name].append(record)
            log(
                f"    {r + 1}/{repeats}  {name:<32s} cpu {cpu1 - cpu0:7.3f} s  wall {wall1 - wall0:7.3f} s"
            )
    return runs


def compare(
    contenders: Callable[[Config, dict[str, Any]], dict[str, Prepare]],
    learn: Any,
    sizes: tuple[Config, Config],
    repeats: int,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The implementation of ``learn``'s optimizer, given to the hand-written contenders too;
    an untimed round on warm-up sizes (imports and first-call costs), then the timed rounds."""
    impl, defaults = implementation(learn.opt), learn.opt.defaults
    same = {key: defaults[key] for key in ("foreach", "fused") if key in defaults}
    log(f"  difflr's default optimizer: {impl['name']} {impl['optimizer']}; warm-up (untimed)")
    interleave(contenders(sizes[0], same), 1, log=lambda s: None)
    return impl, interleave(contenders(sizes[1], same), repeats, log)


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def differences(
    runs: dict[str, list[dict[str, Any]]], name: str, baseline: str, key: str
) -> list[float]:
    """``name``'s ``key`` minus ``baseline``'s, repeat by repeat (the two ran back to back)."""
    return [a[key] - b[key] for a, b in zip(runs[name], runs[baseline])]


def paired(
    runs: dict[str, list[dict[str, Any]]], name: str, baseline: str, key: str = "cpu_s"
) -> dict[str, float]:
    """``name`` over ``baseline`` on ``key``: the ratio of the medians, and the median and range
    of the per-repeat ratios (each repeat runs the two back to back, so load drifts cancel)."""
    ratios = [a[key] / b[key] for a, b in zip(runs[name], runs[baseline])]
    return {
        "ratio_of_medians": median(runs[name], key) / median(runs[baseline], key),
        "paired_median": statistics.median(ratios),
        "paired_min": min(ratios),
        "paired_max": max(ratios),
    }


def ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """difflr over every other contender, on every clock the runs have."""
    keys = [k for k in ("cpu_s", "wall_s", "step_cpu_ms") if k in runs["difflr"][0]]
    return {
        f"difflr/{name}": {key: paired(runs, "difflr", name, key) for key in keys}
        for name in runs
        if name != "difflr"
    }


def summary(
    runs: dict[str, list[dict[str, Any]]], labels: dict[str, str], unit: str = "step"
) -> list[dict[str, Any]]:
    """One table row per contender: medians over the repeats, and difflr over it (paired)."""
    rows = []
    for name, label in labels.items():
        run = runs[name][0]
        row = {"contender": label, "CPU s": median(runs[name], "cpu_s")}
        row["wall s"] = median(runs[name], "wall_s")
        row[f"CPU ms / {unit}"] = median(runs[name], "cpu_ms_per_step")
        row["difflr / this"] = paired(runs, "difflr", name)["paired_median"]
        if "step_cpu_ms" in run:
            row["steady-state step, CPU ms"] = median(runs[name], "step_cpu_ms")
            row["difflr / this, step"] = paired(runs, "difflr", name, "step_cpu_ms")[
                "paired_median"
            ]
            row["fixed CPU ms per fit"] = median(runs[name], "fixed_cpu_ms")
        rows.append(row)
    return rows


def ratio_target(
    comparison: str, ratio: dict[str, float], bound: float, strict: bool = False
) -> dict[str, Any]:
    """A target row, judged on the median of the paired ratios."""
    value = ratio["paired_median"]
    return {
        "comparison": comparison,
        "target": f"{'<' if strict else '≤'} {bound}",
        "measured": f"{value:.3f} ({ratio['paired_min']:.2f}–{ratio['paired_max']:.2f}); "
        f"of the medians {ratio['ratio_of_medians']:.3f}",
        "holds": value < bound if strict else value <= bound,
    }


# --------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    import lightning
    import torchvision

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [ln for ln in lines if ln.startswith("model name")]
    git = ["git", "describe", "--always", "--dirty"]
    revision = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, check=False).stdout
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": models[0].split(":", 1)[1].strip() if models else platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "difflr_revision": revision.strip() or "unknown",
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
    }
