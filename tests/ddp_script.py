"""Train with ``strategy="ddp"`` on 2 CPU processes (gloo) and save what each rank ends with.

Run as ``python tests/ddp_script.py OUTDIR`` (``tests/test_ddp.py`` does, in a subprocess).
Lightning's script launcher starts rank 1 by running this same command again with
``LOCAL_RANK=1``: everything happens under ``if __name__ == "__main__"``, and the model and data
are built from fixed seeds, so both ranks start from the same state. Each rank writes
``OUTDIR/rank{r}.pt``: the model's state after every fit (and every phase of ``fine_tune`` and
``fit_stages``), the recorder's per-step LRs, what ``validate`` and ``get_preds`` return, the
lr_find results, the refusal of ``GradualUnfreezing``, and a control run in which the replicas
are expected to drift.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

#: Epochs of each fit; the tests read them from the results.
HEAD_EPOCHS, UNFROZEN_EPOCHS = 2, 2
#: The fit_stages plan: (freeze_to, epochs, lr_max).
STAGES = [(-1, 1, 1e-2), (-2, 1, (1e-3, 1e-2)), (0, 1, (1e-4, 1e-2))]
LR_FIND_ITERATIONS = 60
#: Rank 1's loss jumps at this step of a second sweep, so that its own stop rule would fire there.
SPIKE_AT = 20
#: Items of the dataset given to get_preds: odd, so that the two shards differ in length.
PREDS_ITEMS = 95


def state(module: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def ddp_kwargs() -> dict[str, Any]:
    return {"strategy": "ddp", "accelerator": "cpu", "devices": 2}


def main(out: Path) -> None:
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from difflr import Learner, Stage, accuracy
    from difflr.callbacks.unfreezing import GradualUnfreezing
    from difflr.training.module import LearnerModule
    from tests.helpers import make_learner, make_loaders, make_model, three_groups

    torch.set_num_threads(1)  # two processes on a two-core machine

    class Tap(Callback):
        """The module's state at the start and end of every Trainer, and what DDP was given."""

        def __init__(self) -> None:
            self.fits: list[dict[str, Any]] = []

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            wrapper = trainer.strategy.model
            self.fits.append(
                {
                    "start": state(pl_module),
                    "wrapper": type(wrapper).__name__,
                    "find_unused_parameters": getattr(wrapper, "find_unused_parameters", None),
                    "trainable": sorted(
                        n for n, p in pl_module.named_parameters() if p.requires_grad
                    ),
                    "num_training_batches": trainer.num_training_batches,
                    "estimated_stepping_batches": trainer.estimated_stepping_batches,
                }
            )

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.fits[-1]["end"] = state(pl_module)

        def take(self) -> list[dict[str, Any]]:
            fits, self.fits = self.fits, []
            return fits

    def record(learn: Learner, tap: Tap) -> dict[str, Any]:
        rec = learn.recorder
        return {
            "fits": tap.take(),
            "lrs": rec.lrs,
            "moms": rec.moms,
            "boundaries": list(rec.boundaries),
            "trainable": [list(t) for t in rec.trainable],
            "values": list(rec.values),
        }

    results: dict[str, Any] = {"pid": os.getpid(), "times": {}}
    train_dl, valid_dl = make_loaders()
    tap = Tap()
    learn = make_learner(
        out / "run",
        data=(train_dl, valid_dl),
        metrics=accuracy,
        callbacks=[tap],
        logger=True,  # this run's TensorBoard timeline is checked too
        **ddp_kwargs(),
    )
    results["n_batches"] = len(train_dl)

    # freeze -> fit_one_cycle -> unfreeze -> fit_one_cycle(slice(...))
    start = time.perf_counter()
    learn.freeze()
    learn.fit_one_cycle(HEAD_EPOCHS, 1e-2)
    trainer = learn.trainer
    results["rank"], results["world_size"] = trainer.global_rank, trainer.world_size
    results["head"] = record(learn, tap)
    results["head"]["preview"] = learn.preview_one_cycle(HEAD_EPOCHS, 1e-2).lrs
    learn.unfreeze()
    learn.fit_one_cycle(UNFROZEN_EPOCHS, slice(1e-4, 1e-2))
    results["unfrozen"] = record(learn, tap)
    results["times"]["freeze_fit_unfreeze_fit"] = time.perf_counter() - start

    # After the fit: validate, and get_preds through a shuffling, drop_last loader (rebuilt) of
    # an odd number of items, sharded unevenly; each rank must get every item once, in order.
    start = time.perf_counter()
    x_valid, y_valid = valid_dl.dataset.tensors
    odd = TensorDataset(x_valid[:PREDS_ITEMS], y_valid[:PREDS_ITEMS])
    shuffled = DataLoader(odd, batch_size=16, shuffle=True, drop_last=True)
    results["after_fit"] = {
        "state": state(learn.module),
        "validate": learn.validate(),
        "get_preds": learn.get_preds(shuffled, with_input=True, with_loss=True),
    }
    results["times"]["after_fit"] = time.perf_counter() - start

    # lr_find from a frozen state, diverging before its end (rank 0 decides when to stop)
    start = time.perf_counter()
    learn.freeze()
    before = state(learn.module)
    opt_before = learn.opt.state_dict()
    flags_before = [p.requires_grad for p in learn.module.parameters()]
    suggested = learn.lr_find(
        end_lr=1000.0, num_it=LR_FIND_ITERATIONS, show_plot=False, suggest_funcs=_suggest_funcs()
    )
    results["lr_find"] = {
        "before": before,
        "after": state(learn.module),
        "opt_equal": _same_optimizer_state(opt_before, learn.opt.state_dict()),
        "flags_equal": flags_before == [p.requires_grad for p in learn.module.parameters()],
        "suggested": tuple(suggested),
        "fields": suggested._fields,
        "points": dict(learn.recorder.lr_find_points),
        "n_steps": len(learn.recorder.lrs),
        "losses": learn.recorder.losses,
        "lrs": learn.recorder.lrs[:, -1],
    }
    results["times"]["lr_find"] = time.perf_counter() - start

    # A sweep in which rank 1 alone sees a loss spike: rank 0's rule must still decide for both
    # (a rank stopping alone would leave the other waiting in DDP's all-reduce).
    class SpikeOnRankOne:
        """Cross-entropy, plus a constant (the gradient is unchanged) at rank 1's SPIKE_AT-th call."""

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            loss = F.cross_entropy(preds, target)
            if torch.distributed.get_rank() == 1 and self.calls == SPIKE_AT:
                loss = loss + 1000.0
            return loss

    spiky = make_learner(
        out / "spiky", data=(train_dl, None), loss_func=SpikeOnRankOne(), **ddp_kwargs()
    )
    spiky.freeze()
    suggested = spiky.lr_find(end_lr=1000.0, num_it=LR_FIND_ITERATIONS, show_plot=False)
    results["lr_find_spike"] = {
        "suggested": tuple(suggested),
        "n_steps": len(spiky.recorder.lrs),
        "losses": spiky.recorder.losses,
    }

    # fine_tune: the head alone, then everything (two Trainers, two DDP wrappers)
    start = time.perf_counter()
    learn.fine_tune(1, base_lr=1e-2, freeze_epochs=1)
    results["fine_tune"] = record(learn, tap)
    results["times"]["fine_tune"] = time.perf_counter() - start

    # fit_stages: unfreeze one group per stage
    start = time.perf_counter()
    plan = [
        Stage(n, epochs, slice(*lr) if isinstance(lr, tuple) else lr) for n, epochs, lr in STAGES
    ]
    learn.fit_stages(plan)
    results["stages"] = record(learn, tap)
    results["times"]["fit_stages"] = time.perf_counter() - start

    # No validation loop: BatchNorm statistics must still end identical on every rank.
    start = time.perf_counter()
    no_valid = make_learner(
        out / "no_valid", data=(train_dl, None), callbacks=[tap], **ddp_kwargs()
    )
    no_valid.fit_one_cycle(1, 1e-2)
    results["no_valid"] = record(no_valid, tap)
    results["no_valid"]["final"] = state(no_valid.module)
    results["times"]["no_valid"] = time.perf_counter() - start

    # GradualUnfreezing inside one trainer.fit must refuse under DDP.
    start = time.perf_counter()
    model = make_model()
    module = LearnerModule(
        model, F.cross_entropy, optimizer=lambda: torch.optim.AdamW(model.parameters())
    )
    callback = GradualUnfreezing(
        [Stage(-1, 1, 1e-3), Stage(0, 1, slice(1e-5, 1e-3))],
        splitter=lambda m: list(three_groups(m.model).values()),
    )
    gradual = pl.Trainer(
        max_epochs=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **ddp_kwargs(),
    )
    try:
        gradual.fit(module, train_dl)
        results["gradual_unfreezing"] = None
    except ValueError as error:
        results["gradual_unfreezing"] = str(error)
    results["gradual_unfreezing_froze"] = not all(p.requires_grad for p in model.parameters())
    results["times"]["gradual_unfreezing"] = time.perf_counter() - start

    # Control: unfreezing inside one fit without a fresh DDP wrapper makes the replicas drift,
    # which shows that the comparisons above can see a drift.
    start = time.perf_counter()
    model = make_model()
    for p in model[:5].parameters():
        p.requires_grad_(False)

    class UnfreezeAtEpoch1(Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 1:
                for p in model.parameters():
                    p.requires_grad_(True)

    module = LearnerModule(
        model, F.cross_entropy, optimizer=lambda: torch.optim.SGD(model.parameters(), lr=0.1)
    )
    control = pl.Trainer(
        max_epochs=2,
        callbacks=[UnfreezeAtEpoch1()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **ddp_kwargs(),
    )
    control.fit(module, train_dl)
    results["control"] = state(module)
    results["times"]["control"] = time.perf_counter() - start

    torch.save(results, out / f"rank{results['rank']}.pt")


def _suggest_funcs() -> tuple[Any, ...]:
    from difflr import minimum, steep, valley

    return (valley, steep, minimum)


def _same_optimizer_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for key, values in a["state"].items():
        for name, value in values.items():
            other = b["state"][key][name]
            if isinstance(value, torch.Tensor):
                if not torch.equal(value, other):
                    return False
            elif value != other:
                return False
    return True


if __name__ == "__main__":
    # Run as a script, this file's folder is on sys.path; the tests' helpers need the repo root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(Path(sys.argv[1]))
