"""The main job: transfer learning with difflr, offline, on CPU, in about three minutes.

``python -m difflr.demo`` trains a ResNet-18 on a *source* task, then fine-tunes it on a *target*
task that has only a few labelled images per class, and compares three ways of training the
target model with the same number of epochs:

1. ``scratch``: a fresh ResNet-18, ``lr_find`` → ``fit_one_cycle``.
2. ``transfer: discriminative``: the source backbone with a fresh head, ``freeze`` →
   ``lr_find`` → ``fit_one_cycle`` (head) → ``unfreeze`` → ``fit_one_cycle(slice(lo, hi))``.
3. ``transfer: stage plan``: the source backbone with a fresh head, trained with the original
   example's six-stage milestone plan through ``Learner.fit_stages``.

The data are the UCI handwritten digits that ship with scikit-learn (8x8 images, upsampled to
32x32): the source task is to tell digits 0-4 apart (all of their ~900 images); the target task
is to tell digits 5-9 apart from ``--shots`` labelled images per class, tested on a fixed,
held-out half of the 5-9 images. The target runs are repeated ``--repeats`` times with different
draws of the labelled images, since with so few labels one draw can move the accuracy by several
points. Nothing is downloaded unless ``--data cifar10`` or ``--weights imagenet`` asks for it.

What it showed when it was written (defaults, 2 CPU cores, about 110 s): test accuracy
``scratch`` 0.915 ± 0.023, ``transfer: discriminative`` 0.784 ± 0.038, ``transfer: stage plan``
0.762 ± 0.032 (chance 0.2); with ``--lr 5e-3`` instead of the valley suggestions (about 5e-4
for the transfer head), 0.937, 0.831 and 0.762. On these digits, the features a ResNet-18
learns from 0-4 do not beat what it learns about 5-9 from 25 shifted images. Read
``results.json`` for the run at hand.

Outputs under ``--out`` (default ``./difflr_demo``): ``results.json``, PNG figures in
``figures/`` (the LR range test, every group's LR and momentum schedule, the losses),
TensorBoard logs in ``tensorboard/`` (``tensorboard --logdir difflr_demo``), and the prepared
data in ``data/`` (a second run skips the preparation).

Examples:
    From Python, with tiny settings (the command line takes the same flags)::

        from difflr.demo import main
        results = main(["--quick", "--out", "/tmp/difflr_demo"])
        results["runs"]["scratch"]["accuracy"]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from difflr import Learner, accuracy, minimum, slide, steep, valley
from difflr.vision import load_arch, vision_learner

__all__ = ["MILESTONES", "DemoError", "main", "parse_args"]

ARCH = "resnet18"
IMAGE_SIZE = 32  # pixels; the digits' 8x8 and CIFAR-10's 32x32 images are brought to this size
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
SOURCE_LR = 2e-3  # the source run stands in for a pretrained model: a plain, known-good recipe
MAX_SHIFT = 3  # pixels of random translation, the only augmentation (train sets only)
QUICK_LR = 3e-3
RUN_NAMES = ("scratch", "transfer: discriminative", "transfer: stage plan")

#: The original example's milestone plan (ORIGINAL_EXAMPLE.md), verbatim: unfreeze one of the
#: six ResNet-18 groups per epoch, from the head down, with a fresh one-cycle each time.
# fmt: off
MILESTONES: dict[int, dict[str, Any]] = {
    1: {"freeze_to": -1, "duration": 1, "pct_start": .3, "lrs": [.0, .0, .0, .0, .0, 1e-3]},
    2: {"freeze_to": -2, "duration": 1, "pct_start": .3, "lrs": [.0, .0, .0, .0, 5e-4, 5e-4]},
    3: {"freeze_to": -3, "duration": 1, "pct_start": .3, "lrs": [.0, .0, .0, 5e-5, 1e-4, 1e-4]},
    4: {"freeze_to": -4, "duration": 1, "pct_start": .3, "lrs": [.0, .0, 1e-5, 1e-5, 5e-5, 5e-5]},
    5: {"freeze_to": -5, "duration": 1, "pct_start": .3, "lrs": [.0, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5]},
    6: {"freeze_to": 0, "duration": 1, "pct_start": .3, "lrs": [1e-6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6]},
}
# fmt: on


class DemoError(RuntimeError):
    """A problem the user can fix (no network for a download, a bad flag combination)."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on; ``results.json`` records it."""

    out: Path
    data: str
    weights: str
    seed: int
    epochs: int  # target epochs of every run (the stage plan: its six stages, scaled)
    source_epochs: int
    shots: int  # labelled target images per class
    repeats: int  # draws of the labelled target images
    epoch_batches: int  # batches per target epoch (the few labelled images, shuffled, repeated)
    batch_size: int
    lr: float | None  # peak LR of the target runs; None: lr_find's valley suggestion
    lr_find_iters: int
    test_limit: int | None  # at most this many target test images (None: all)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Read the command line (``python -m difflr.demo --help`` lists the flags)."""
    parser = argparse.ArgumentParser(
        prog="python -m difflr.demo",
        description="Transfer learning with difflr: a source-trained ResNet-18 fine-tuned on a "
        "few-label target task, against training from scratch.",
    )
    parser.add_argument("--out", type=Path, default=Path("difflr_demo"), help="output folder")
    parser.add_argument(
        "--epochs", type=int, default=6, help="target epochs per run (default: 6, the plan's)"
    )
    parser.add_argument("--source-epochs", type=int, default=12, help="source task epochs")
    parser.add_argument("--shots", type=int, default=5, help="labelled target images per class")
    parser.add_argument("--repeats", type=int, default=3, help="draws of the labelled images")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak LR of the scratch run and of the transfer run's head phase (default: the "
        "valley suggestion of each run's lr_find)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data",
        choices=("digits", "cifar10"),
        default="digits",
        help="digits: scikit-learn's, offline; cifar10: downloads CIFAR-10 (needs network)",
    )
    parser.add_argument(
        "--weights",
        choices=("none", "imagenet"),
        default="none",
        help="none: pretrain on the source task; imagenet: start the transfer runs from "
        "torchvision's ImageNet ResNet-18 weights instead (downloaded once, needs network)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny epochs and subsets: a smoke test in seconds"
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "source_epochs", "shots", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    quick = args.quick
    return Settings(
        out=args.out,
        data=args.data,
        weights=args.weights,
        seed=args.seed,
        epochs=args.epochs,
        source_epochs=2 if quick else args.source_epochs,
        shots=args.shots,
        repeats=1 if quick else args.repeats,
        epoch_batches=5 if quick else 20,
        batch_size=16,
        # A 20-step sweep is too coarse to suggest from: quick runs use a fixed LR.
        lr=QUICK_LR if quick and args.lr is None else args.lr,
        lr_find_iters=20 if quick else 100,
        test_limit=200 if quick else None,
    )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    """Normalised images ``(n, 3, 32, 32)`` and their integer labels ``(n,)``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor | np.ndarray) -> Images:
        index = torch.as_tensor(index, dtype=torch.long)
        return Images(self.x[index], self.y[index])

    def of_classes(self, classes: Sequence[int]) -> Images:
        """The images of ``classes``, relabelled ``0 .. len(classes) - 1``."""
        keep = torch.isin(self.y, torch.tensor(classes))
        relabel = torch.full((int(self.y.max()) + 1,), -1, dtype=torch.long)
        relabel[torch.tensor(classes)] = torch.arange(len(classes))
        return Images(self.x[keep], relabel[self.y[keep]])


@dataclass(frozen=True)
class Task:
    """The source task and the target task's pool of labellable images and its test set."""

    source: Images
    target_pool: Images  # the labelled target images of each repeat are drawn from these
    target_test: Images


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = (x - x.mean()) / x.std()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _prepare_digits() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits  # ships its data: no download

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return {"x": x, "y": torch.tensor(digits.target, dtype=torch.long)}


def _prepare_cifar10(root: Path) -> dict[str, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    try:
        parts = [CIFAR10(str(root), train=train, download=True) for train in (True, False)]
    except Exception as error:  # URLError, socket errors, corrupt partial downloads, ...
        raise DemoError(
            f"could not download CIFAR-10 into {root} ({type(error).__name__}: {error}). "
            "--data cifar10 needs network access once; offline, run the demo with "
            "--data digits (the default), or put the extracted cifar-10-batches-py folder in "
            f"{root}."
        ) from error
    x = torch.cat([torch.from_numpy(p.data) for p in parts]).permute(0, 3, 1, 2)  # uint8 NCHW
    y = torch.cat([torch.tensor(p.targets, dtype=torch.long) for p in parts])
    is_test = torch.cat([torch.zeros(len(parts[0])), torch.ones(len(parts[1]))]).bool()
    return {"x": x, "y": y, "is_test": is_test}


def load_data(settings: Settings) -> tuple[dict[str, torch.Tensor], bool]:
    """The prepared images and labels, from the cache under ``out/data`` when it holds them.

    Returns:
        The tensors, and whether they came from the cache.
    """
    folder = settings.out / "data"
    cache = folder / f"{settings.data}_{IMAGE_SIZE}px.pt"
    if cache.is_file():
        return torch.load(cache), True
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _prepare_digits() if settings.data == "digits" else _prepare_cifar10(folder)
    torch.save(tensors, cache)
    return tensors, False


def make_task(tensors: dict[str, torch.Tensor], settings: Settings) -> Task:
    """Cut the data into the source task, the target pool and the target test set."""
    x = tensors["x"].float()
    if tensors["x"].dtype == torch.uint8:  # CIFAR-10
        x = x / 255.0
    images = Images(_normalise(x), tensors["y"])
    generator = torch.Generator().manual_seed(settings.seed)
    if "is_test" in tensors:  # CIFAR-10: its test split is the target test set
        train = images.subset(torch.where(~tensors["is_test"])[0])
        source, pool = train.of_classes(SOURCE_CLASSES), train.of_classes(TARGET_CLASSES)
        test = images.subset(torch.where(tensors["is_test"])[0]).of_classes(TARGET_CLASSES)
    else:  # digits: hold out a fixed half of each target class as the test set
        source, target = images.of_classes(SOURCE_CLASSES), images.of_classes(TARGET_CLASSES)
        pool_index, test_index = [], []
        for label in range(len(TARGET_CLASSES)):
            index = torch.where(target.y == label)[0]
            index = index[torch.randperm(len(index), generator=generator)]
            pool_index.append(index[: len(index) // 2])
            test_index.append(index[len(index) // 2 :])
        pool, test = target.subset(torch.cat(pool_index)), target.subset(torch.cat(test_index))
    if settings.test_limit is not None and len(test) > settings.test_limit:
        test = test.subset(torch.randperm(len(test), generator=generator)[: settings.test_limit])
    return Task(source, pool, test)


def draw_shots(pool: Images, shots: int, generator: torch.Generator) -> Images:
    """``shots`` random images of each class of ``pool``."""
    n_classes = int(pool.y.max()) + 1
    index = []
    for label in range(n_classes):
        candidates = torch.where(pool.y == label)[0]
        if len(candidates) < shots:
            raise DemoError(
                f"class {label} of the target pool has {len(candidates)} images, fewer than "
                f"--shots {shots}; lower --shots."
            )
        index.append(candidates[torch.randperm(len(candidates), generator=generator)[:shots]])
    return pool.subset(torch.cat(index))


class Shifted(Dataset):
    """``images`` with a random translation of up to ``max_shift`` pixels each time one is read.

    The digits sit on a uniform background, so rolling the image (wrapping around) only moves
    background pixels across the border.
    """

    def __init__(self, images: Images, max_shift: int = MAX_SHIFT) -> None:
        self.images = images
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
        return torch.roll(self.images.x[index], (dy, dx), dims=(1, 2)), self.images.y[index]


def make_loaders(
    train: Images, valid: Images, batch_size: int, n_batches: int | None = None
) -> tuple[DataLoader, DataLoader]:
    """Shuffled, augmented training batches (``n_batches`` per epoch, the set repeated as
    needed; default one pass) and plain validation batches."""
    dataset = Shifted(train)
    n_samples = len(dataset) if n_batches is None else n_batches * batch_size
    sampler = RandomSampler(dataset, num_samples=n_samples)  # without replacement, per pass
    return (
        DataLoader(dataset, batch_size=batch_size, sampler=sampler),
        DataLoader(TensorDataset(valid.x, valid.y), batch_size=256),
    )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, images: Images, batch_size: int = 256) -> float:
    """Accuracy of ``model`` on ``images``, in [0, 1] (the model is left in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images.x[start : start + batch_size].to(device)
        y = images.y[start : start + batch_size].to(device)
        correct += int((model(x).argmax(dim=1) == y).sum())
    return correct / len(images)


class Figures:
    """Saves the figures of the first repeat as ``out/figures/<prefix>_<kind>.png``."""

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.folder = folder
        self.enabled = enabled
        self.saved: list[str] = []

    def save(self, prefix: str, kind: str, make: Callable[[], Any]) -> None:
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{prefix}_{kind}.png"
        make().savefig(path, dpi=100)
        self.saved.append(str(path))

    def save_record(self, prefix: str, learn: Learner) -> None:
        """Every group's LR and momentum, and the losses, of the learner's last fit."""
        self.save(prefix, "sched", learn.recorder.plot_sched)
        self.save(prefix, "loss", learn.recorder.plot_loss)


def _learner_kwargs(settings: Settings, log_dir: str) -> dict[str, Any]:
    return {
        "metrics": accuracy,
        "path": settings.out / "tensorboard" / log_dir,
        "checkpoint": False,  # nothing resumes here; a ResNet-18 checkpoint per epoch is slow
        "enable_progress_bar": False,
    }


def _seed(seed: int) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)


def train_source(task: Task, settings: Settings, figures: Figures) -> tuple[nn.Module, dict]:
    """Train a ResNet-18 to tell the source classes apart; return it and its scores."""
    _seed(settings.seed)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(task.source), generator=generator)
    n_valid = len(order) // 5  # a fifth of the source images measure the source accuracy
    train, valid = task.source.subset(order[n_valid:]), task.source.subset(order[:n_valid])
    learn = vision_learner(
        ARCH,
        make_loaders(train, valid, batch_size=64),
        n_out=len(SOURCE_CLASSES),
        **_learner_kwargs(settings, "source"),
    )
    learn.fit_one_cycle(settings.source_epochs, SOURCE_LR)
    figures.save_record("source", learn)
    scores = {
        "accuracy": evaluate(learn.model, valid),
        "seconds": time.perf_counter() - start,
        "epochs": settings.source_epochs,
        "n_train": len(train),
        "lr_max": SOURCE_LR,
        "classes": f"{SOURCE_CLASSES[0]}-{SOURCE_CLASSES[-1]}",
    }
    return learn.model, scores


def imagenet_backbone() -> nn.Module:
    """torchvision's ImageNet ResNet-18 (downloaded once into torch's hub cache)."""
    try:
        return load_arch(ARCH, weights="IMAGENET1K_V1", allow_download=True)
    except Exception as error:  # URLError, socket errors, a RuntimeError from load_arch
        raise DemoError(
            f"could not load the ImageNet weights of {ARCH} ({type(error).__name__}: {error}). "
            "--weights imagenet needs network access once (or the file in torch's hub cache); "
            "offline, run the demo with --weights none (the default), which pretrains on the "
            "source task instead."
        ) from error


def choose_lr(learn: Learner, settings: Settings, figures: Figures, prefix: str) -> tuple:
    """The LR range test: its figure, every suggestion, and the LR used (``--lr``, else
    the valley suggestion, fastai's default)."""
    suggested = learn.lr_find(
        num_it=settings.lr_find_iters,
        show_plot=False,
        suggest_funcs=(valley, slide, minimum, steep),
    )
    figures.save(prefix, "lr_find", learn.recorder.plot_lr_find)
    lr = suggested.valley if settings.lr is None else settings.lr
    return lr, dict(zip(suggested._fields, suggested))


def run_scratch(
    data: tuple[DataLoader, DataLoader], settings: Settings, log_dir: str, figures: Figures
) -> tuple[Learner, dict]:
    """A fresh ResNet-18: ``lr_find``, then one cycle over every epoch of the budget."""
    learn = vision_learner(ARCH, data, len(TARGET_CLASSES), **_learner_kwargs(settings, log_dir))
    lr, suggested = choose_lr(learn, settings, figures, "scratch")
    learn.fit_one_cycle(settings.epochs, lr)
    figures.save_record("scratch", learn)
    return learn, {"epochs": settings.epochs, "lr_max": lr, "suggested": suggested}


def run_discriminative(
    backbone: nn.Module,
    data: tuple[DataLoader, DataLoader],
    settings: Settings,
    log_dir: str,
    figures: Figures,
) -> tuple[Learner, dict]:
    """fastai's recipe: train the new head on the frozen body, then everything, with LRs
    spread geometrically from the stem (``lr / 200``) to the head (``lr / 2``)."""
    learn = vision_learner(
        copy.deepcopy(backbone), data, len(TARGET_CLASSES), **_learner_kwargs(settings, log_dir)
    )
    learn.freeze()
    # The LR range test on the frozen model: the sweep moves the head (and the norm layers).
    lr, suggested = choose_lr(learn, settings, figures, "transfer")
    head_epochs = 1
    learn.fit_one_cycle(head_epochs, lr)
    figures.save_record("transfer_head", learn)
    learn.unfreeze()
    epochs = max(settings.epochs - head_epochs, 1)
    lr_max = slice(lr / 200, lr / 2)
    learn.fit_one_cycle(epochs, lr_max)
    figures.save_record("transfer_unfrozen", learn)
    return learn, {
        "epochs": head_epochs + epochs,
        "lr_max": lr,
        "lr_max_unfrozen": [lr_max.start, lr_max.stop],
        "suggested": suggested,
    }


def run_stage_plan(
    backbone: nn.Module,
    data: tuple[DataLoader, DataLoader],
    settings: Settings,
    log_dir: str,
    figures: Figures,
) -> tuple[Learner, dict]:
    """The original example's milestone plan, one stage per layer group, via ``fit_stages``.

    Its stages last one epoch each (six in all); ``--epochs 12`` makes them two each, and so on.
    """
    from difflr import Stage  # the stage plans module

    learn = vision_learner(
        copy.deepcopy(backbone), data, len(TARGET_CLASSES), **_learner_kwargs(settings, log_dir)
    )
    scale = max(1, round(settings.epochs / len(MILESTONES)))
    stages = [
        dataclasses.replace(stage, epochs=stage.epochs * scale)
        for stage in Stage.from_milestones(MILESTONES)
    ]
    learn.fit_stages(stages)
    figures.save_record("stages", learn)
    return learn, {"epochs": sum(stage.epochs for stage in stages), "milestones": MILESTONES}


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def format_table(results: dict[str, Any]) -> str:
    """The results as a plain-text table: run, epochs, accuracy, wall time."""
    repeats = results["settings"]["repeats"]
    header = ("run", "epochs", f"test accuracy (mean ± std of {repeats})", "each draw", "time")
    rows = [header]
    source = results.get("source")
    if source is not None:
        rows.append(
            (
                f"source ({results['settings']['data']} {source['classes']}, held out)",
                str(source["epochs"]),
                f"{source['accuracy']:.3f}",
                "",
                f"{source['seconds']:.0f} s",
            )
        )
    for name, run in results["runs"].items():
        rows.append(
            (
                name,
                str(run["epochs"]),
                f"{run['accuracy']:.3f} ± {run['accuracy_std']:.3f}",
                " ".join(f"{a:.3f}" for a in run["accuracies"]),
                f"{run['seconds']:.0f} s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; print the table; write ``results.json``, figures and logs under ``--out``.

    Args:
        argv: Command-line arguments (``None``: ``sys.argv[1:]``), e.g. ``["--quick"]``.

    Returns:
        The results: ``settings``, ``source`` (None with ``--weights imagenet``) and ``runs``,
        ``{name: {accuracy, accuracy_std, accuracies, seconds, epochs, lr_max, ...}}``, plus
        ``figures`` (the PNG paths) and ``seconds`` (the whole job).

    Raises:
        DemoError: A download that ``--data cifar10`` or ``--weights imagenet`` needs failed.
    """
    settings = parse_args(argv)
    with warnings.catch_warnings():
        # Lightning's notes on a DataLoader without workers (the data are tiny tensors) and a
        # deprecation inside Lightning itself: noise in the demo's output.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
        return _run(settings)


def _run(settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    print(
        f"difflr demo: {settings.data}, source classes {SOURCE_CLASSES} -> target classes "
        f"{TARGET_CLASSES} with {settings.shots} labels per class, {settings.repeats} draw(s); "
        f"output in {settings.out}",
        flush=True,
    )
    tensors, cached = load_data(settings)
    task = make_task(tensors, settings)
    print(
        f"data: {'cached' if cached else 'prepared'} ({len(task.source)} source images, "
        f"{len(task.target_pool)} target images to label from, {len(task.target_test)} test)",
        flush=True,
    )
    figures = Figures(settings.out / "figures")

    source_scores = None
    if settings.weights == "imagenet":
        backbone = imagenet_backbone()
    else:
        print(f"\n== source task: {ARCH} from scratch on classes {SOURCE_CLASSES}", flush=True)
        backbone, source_scores = train_source(task, settings, figures)

    runs = {name: {"accuracies": [], "seconds": 0.0} for name in RUN_NAMES}
    generator = torch.Generator().manual_seed(settings.seed + 1)
    for repeat in range(settings.repeats):
        shots = draw_shots(task.target_pool, settings.shots, generator)
        figures.enabled = repeat == 0
        for name in RUN_NAMES:
            print(f"\n== draw {repeat + 1}/{settings.repeats}: {name}", flush=True)
            _seed(settings.seed + repeat)  # every run of a draw starts from the same seed
            data = make_loaders(
                shots, task.target_test, settings.batch_size, settings.epoch_batches
            )
            log_dir = f"{name.replace(': ', '_').replace(' ', '_')}/draw{repeat}"
            start = time.perf_counter()
            if name == "scratch":
                learn, info = run_scratch(data, settings, log_dir, figures)
            elif name == "transfer: discriminative":
                learn, info = run_discriminative(backbone, data, settings, log_dir, figures)
            else:
                learn, info = run_stage_plan(backbone, data, settings, log_dir, figures)
            runs[name]["seconds"] += time.perf_counter() - start
            runs[name]["accuracies"].append(evaluate(learn.model, task.target_test))
            for key in ("lr_max", "suggested"):
                if key in info:
                    runs[name].setdefault(key, []).append(info.pop(key))
            runs[name].update(info)
    for run in runs.values():
        run["accuracy"], run["accuracy_std"] = _mean_std(run["accuracies"])
        run["seconds"] /= settings.repeats

    results = {
        "settings": {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k != "out"},
            "out": str(settings.out),
            "arch": ARCH,
            "source_classes": SOURCE_CLASSES,
            "target_classes": TARGET_CLASSES,
            "n_target_test": len(task.target_test),
            "chance": 1 / len(TARGET_CLASSES),
        },
        "source": source_scores,
        "runs": runs,
        "figures": figures.saved,
        "seconds": time.perf_counter() - started,
    }
    (settings.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n" + format_table(results))
    print(
        f"\n(time: mean wall time of one draw of a run; whole job {results['seconds']:.0f} s)\n"
        f"results.json, figures/ and tensorboard/ are in {settings.out}",
        flush=True,
    )
    return results


def _cli() -> None:
    try:
        main()
    except DemoError as error:
        sys.exit(f"difflr.demo: {error}")


if __name__ == "__main__":
    _cli()
