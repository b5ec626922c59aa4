"""Draw the figures of the docs with difflr's own schedule and plotting code.

Run from the repository root after changing a schedule or a plot, or committing new results of
the main job: ``python docs/gen_figures.py``. It writes ``docs/img/one_cycle.png`` and
``docs/img/fine_tune.png``, and from ``docs/results/demo.json`` ``docs/img/demo_accuracy.png`` and
``docs/img/demo_lr_sweep.png``; commit them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from difflr import Learner, ParamScheduler, expand_lrs
from difflr.plotting import plot_sched
from difflr.policy.schedules import one_cycle_lr, one_cycle_mom

IMG = Path(__file__).resolve().parent / "img"
RESULTS = Path(__file__).resolve().parent / "results" / "demo.json"
NAMES = ["0.stem", "1.body", "2.head"]


def one_cycle_figure(n_steps: int = 200):
    """``fit_one_cycle(lr_max=slice(1e-5, 1e-3))`` over 3 groups, as ``ParamScheduler`` runs it."""
    lr_max = expand_lrs(slice(1e-5, 1e-3), len(NAMES))
    scheduler = ParamScheduler(one_cycle_lr(lr_max, pct_start=0.25), one_cycle_mom(pct_start=0.25))
    lrs, moms = scheduler.schedule(n_steps, index=range(len(NAMES)))
    return plot_sched(lrs, moms, NAMES)


def fine_tune_figure():
    """``learn.fine_tune(4)``'s two phases for a 3-group model with 25 steps per epoch."""
    data = TensorDataset(torch.zeros(100, 4), torch.zeros(100, dtype=torch.long))
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    learn = Learner(
        model,
        (DataLoader(data, batch_size=4), None),
        loss_func=F.cross_entropy,
        splitter=lambda m: {"stem": m[0], "body": m[1], "head": m[2]},
        logger=False,
    )
    return learn.preview_fine_tune(4).plot_sched()


def demo_figures() -> dict:
    """The main job's figures, drawn from its committed results by the demo's own plotting."""
    from difflr.demos.report import plot_accuracy, plot_lr_sweep

    results = json.loads(RESULTS.read_text())
    figures = {"demo_lr_sweep": plot_lr_sweep(results)}
    if "runs" in results:  # the evaluation is committed
        figures["demo_accuracy"] = plot_accuracy(results)
    return figures


def main() -> None:
    IMG.mkdir(exist_ok=True)
    figures = {"one_cycle": one_cycle_figure(), "fine_tune": fine_tune_figure(), **demo_figures()}
    for name, figure in figures.items():
        # No "Software" metadata, so the file only changes when the picture does.
        figure.savefig(IMG / f"{name}.png", dpi=80, metadata={"Software": None})
        print(f"wrote {IMG / name}.png")


if __name__ == "__main__":
    main()
