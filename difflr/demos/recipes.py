"""The main job's recipes: each fine-tuning method as the difflr calls a user would write, run on
one draw of labelled digits and scored on its test sets, in this process or in a pool of worker
processes (``--workers``).

- ``scratch`` / ``scratch_long``: a randomly initialised slim ResNet, ``fit_one_cycle``.
- ``frozen``: ``freeze(); fit_one_cycle``: the new head (BatchNorm, Linear 128→512, ReLU,
  BatchNorm, Linear 512→10) and the body's BatchNorm layers train; the convolutions do not.
- ``full``: ``fit_one_cycle`` of everything at one LR.
- ``fine_tune``: fastai's ``fine_tune(epochs - 1, base_lr)``: one frozen epoch, then all.
- ``discriminative``: ``freeze(); lr_find(); fit_one_cycle(1, valley); unfreeze();
  fit_one_cycle(epochs - 1, slice(lr / 10, lr))``.
- ``stage_plan``: the original example's six stages (``fit_stages``), one layer group unfrozen
  per epoch, its LRs scaled by ``lr / 1e-3`` (1e-3 is the original plan's head LR).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import multiprocessing
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from difflr import Learner, Stage, minimum, slide, steep, valley, vision_learner
from difflr.demos.backbone import slim_resnet
from difflr.demos.digits import DIGIT_AUGMENT, evaluate, repeating_loader
from difflr.demos.protocol import Draw

__all__ = [
    "CALLS",
    "MILESTONES",
    "RECIPE_NAMES",
    "Figures",
    "Job",
    "RunSpec",
    "Task",
    "run",
    "run_jobs",
    "train_and_test",
]

#: The fine-tuning recipes (and scratch), in the table's order after the baselines.
RECIPE_NAMES = (
    "scratch",
    "scratch_long",
    "frozen",
    "full",
    "fine_tune",
    "discriminative",
    "stage_plan",
)
#: What each recipe calls, for the table and ``results.json``.
CALLS = {
    "scratch": "fit_one_cycle(epochs, lr)  [random init]",
    "scratch_long": "fit_one_cycle(epochs, lr)  [random init, budget x k]",
    "frozen": "freeze(); fit_one_cycle(epochs, lr)",
    "full": "fit_one_cycle(epochs, lr)",
    "fine_tune": "fine_tune(epochs - 1, base_lr=lr)",
    "discriminative": "freeze(); lr_find(); fit_one_cycle(1); unfreeze(); "
    "fit_one_cycle(epochs - 1, slice(lr / 10, lr))",
    "stage_plan": "fit_stages(MILESTONES, LRs x lr / 1e-3)",
}
N_CLASSES = 10
AUGMENT = DIGIT_AUGMENT  # random_affine's rotation (deg), scale, shift: every run alike
LR_SPREAD = 10  # head LR / stem LR of the discriminative run
QUICK_LR = 3e-3  # --quick: a 20-step sweep is too coarse to suggest from
#: The original example's milestone plan (ORIGINAL_EXAMPLE.md), verbatim: unfreeze one of the
#: six ResNet groups per epoch, from the head down, with a fresh one-cycle each time.
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
_MILESTONE_HEAD_LR = 1e-3


@dataclass(frozen=True)
class RunSpec:
    """What a recipe's run depends on besides its LR and its draw."""

    out: Path  # TensorBoard logs and figures go under it
    epochs: int  # target epochs of every recipe
    epoch_batches: int
    batch_size: int
    quick: bool  # the discriminative head phase takes QUICK_LR, not lr_find's suggestion
    lr_find_iters: int


@dataclass
class Task:
    """One draw made ready: the labelled images and the test sets as network inputs."""

    draw: Draw
    train_levels: torch.Tensor
    train_labels: torch.Tensor
    test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]]  # clean and shifted
    seed: int  # torch's seed before every run of this draw: every run starts alike


class Figures:
    """Saves figures as ``out/figures/<name>.png`` while ``enabled`` (the first draw)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.enabled = False
        self.saved: list[str] = []

    def save(self, name: str, make: Callable[[], Any]) -> None:
        if not self.enabled:
            return
        import matplotlib.pyplot as plt

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.png"
        figure = make()
        figure.savefig(path, dpi=100)
        plt.close(figure)  # dozens of runs: keep matplotlib's open figures bounded
        if str(path) not in self.saved:
            self.saved.append(str(path))


def _learner(model: nn.Module, loader: DataLoader, spec: RunSpec, log_dir: str | None) -> Learner:
    """A Learner on ``model`` with a fresh 10-class head: ``vision_learner``, as users write it."""
    return vision_learner(
        model,
        (loader, None),
        n_out=N_CLASSES,
        path=spec.out / "tensorboard" / (log_dir or "unlogged"),
        logger=log_dir is not None,
        checkpoint=False,  # nothing resumes here
        enable_progress_bar=False,
    )


def run(
    name: str,
    lr: float,
    backbone: nn.Module,
    loader: DataLoader,
    spec: RunSpec,
    figures: Figures,
    log_dir: str | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """One recipe at peak LR ``lr``; returns the trained model and what it used."""
    epochs = spec.epochs
    if name in ("scratch", "scratch_long"):  # the same architecture, randomly initialised
        model = slim_resnet(N_CLASSES, backbone.pretraining["config"]["widths"])
    else:
        model = copy.deepcopy(backbone)
    learn = _learner(model, loader, spec, log_dir)
    info: dict[str, Any] = {"epochs": epochs, "call": CALLS[name], "lr": lr}
    if name in ("scratch", "scratch_long", "full"):
        learn.fit_one_cycle(epochs, lr)
    elif name == "frozen":
        learn.freeze()
        learn.fit_one_cycle(epochs, lr)
    elif name == "fine_tune":
        learn.fine_tune(max(epochs - 1, 1), base_lr=lr)
        info["epochs"] = max(epochs - 1, 1) + 1
    elif name == "discriminative":
        learn.freeze()
        suggested = learn.lr_find(
            num_it=spec.lr_find_iters,
            show_plot=False,
            suggest_funcs=(valley, slide, minimum, steep),
        )
        figures.save("discriminative_lr_find", learn.recorder.plot_lr_find)
        info["head_lr"] = QUICK_LR if spec.quick else suggested.valley
        learn.fit_one_cycle(1, info["head_lr"])
        figures.save("discriminative_head_sched", learn.recorder.plot_sched)
        learn.unfreeze()
        learn.fit_one_cycle(max(epochs - 1, 1), slice(lr / LR_SPREAD, lr))
        figures.save("discriminative_unfrozen_sched", learn.recorder.plot_sched)
        info["epochs"] = max(epochs - 1, 1) + 1
    elif name == "stage_plan":
        scale = max(1, round(epochs / len(MILESTONES)))
        factor = lr / _MILESTONE_HEAD_LR
        stages = [
            dataclasses.replace(
                stage,
                epochs=stage.epochs * scale,
                lr_max=[value * factor for value in stage.lrs(len(MILESTONES))],
            )
            for stage in Stage.from_milestones(MILESTONES)
        ]
        learn.fit_stages(stages)
        figures.save("stage_plan_sched", learn.recorder.plot_sched)
        info["epochs"] = sum(stage.epochs for stage in stages)
    else:
        raise ValueError(f"unknown recipe {name!r}; the recipes are {', '.join(RECIPE_NAMES)}.")
    return learn.model, info


def train_and_test(
    name: str,
    lr: float,
    task: Task,
    backbone: nn.Module,
    spec: RunSpec,
    figures: Figures,
    budget: int = 1,
    log: bool = False,
) -> dict[str, Any]:
    """Run recipe ``name`` on ``task`` and score it on every test set of the task."""
    torch.manual_seed(task.seed)
    loader = repeating_loader(
        task.train_levels,
        task.train_labels,
        spec.batch_size,
        spec.epoch_batches * budget,
        AUGMENT,
    )
    start = time.perf_counter()
    with _quiet():
        model, info = run(name, lr, backbone, loader, spec, figures, name if log else None)
    info["seconds"] = time.perf_counter() - start
    info["steps"] = spec.epochs * spec.epoch_batches * budget
    info["scores"] = {key: evaluate(model, *test) for key, test in task.test_sets.items()}
    return info


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back the Learner's per-epoch tables (hundreds of runs) and Lightning's notes on a
    DataLoader without workers (the data are tiny tensors)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
        warnings.filterwarnings("ignore", ".*lbfgs failed to converge.*")
        yield


@dataclass(frozen=True)
class Job:
    """One recipe at one LR and budget on one task (an index into the tasks of `run_jobs`);
    ``log``: write its TensorBoard logs and figures."""

    name: str
    lr: float
    task: int
    budget: int = 1
    log: bool = False


_WORKER: dict[str, Any] = {}


def _start_worker(backbone: nn.Module, spec: RunSpec, tasks: list[Task], threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(backbone=backbone, spec=spec, tasks=tasks)


def _do(job: Job) -> dict[str, Any]:
    spec: RunSpec = _WORKER["spec"]
    figures = Figures(spec.out / "figures")
    figures.enabled = job.log
    info = train_and_test(
        job.name,
        job.lr,
        _WORKER["tasks"][job.task],
        _WORKER["backbone"],
        spec,
        figures,
        job.budget,
        job.log,
    )
    info["figures"] = figures.saved
    return info


def run_jobs(
    jobs: Sequence[Job],
    tasks: list[Task],
    backbone: nn.Module,
    spec: RunSpec,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Run every job; the results in the jobs' order. With ``workers > 1``, in that many worker
    processes (one torch thread each): every run seeds torch from its task, so the results do not
    depend on which process ran it."""
    if workers <= 1 or len(jobs) <= 1:
        _start_worker(backbone, spec, tasks, torch.get_num_threads())
        return [_do(job) for job in jobs]
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(backbone, spec, tasks, 1)
    ) as pool:
        return list(pool.map(_do, jobs))
