"""Train with ``strategy="ddp_fork"`` on 2 CPU processes (gloo) from one Python process, as a
notebook does with ``"ddp_notebook"``, and save what the Learner holds after each call next to
what rank 0 held in the worker.

Run as ``python tests/fork_script.py OUTDIR`` (``tests/test_handback.py`` does, in a
subprocess). For each of `PRECISIONS`, the notebook's process writes ``OUTDIR/{precision}/
parent.pt``; rank 0's worker writes ``OUTDIR/{precision}/rank0-fit{i}-{start,end}.pt``
(`RankZeroTap`). ``tests/test_handback.py`` also runs
`RankZeroTap` in a real Jupyter kernel.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

#: Epochs of the two fits; optimizer steps per epoch and process (96 items, batches of 16, two
#: shards of 48): 3.
EPOCHS = (2, 1)
STEPS_PER_EPOCH = 3
LR_FIND_ITERATIONS = 12
PRECISIONS = ("32-true", "bf16-mixed")


def snapshot(learn: Any) -> dict[str, Any]:
    """What a Learner keeps between calls, copied."""
    import copy

    import torch

    return {
        "model": {k: v.detach().clone() for k, v in learn.model.state_dict().items()},
        "opt": copy.deepcopy(learn.opt.state_dict()),
        "lrs": learn.recorder.lrs.copy(),
        "moms": learn.recorder.moms.copy(),
        "losses": learn.recorder.losses.copy(),
        "values": [dict(v) for v in learn.recorder.values],
        "boundaries": list(learn.recorder.boundaries),
        "trainable": [list(t) for t in learn.recorder.trainable],
        "rng": torch.get_rng_state(),
    }


class NanAtStep:
    """Cross-entropy, NaN at call ``n`` (counted in each process from the fork)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, preds: Any, target: Any) -> Any:
        import torch.nn.functional as F

        self.calls += 1
        loss = F.cross_entropy(preds, target)
        return loss * float("nan") if self.calls == self.n else loss


def crash_and_resume(out: Path, precision: str) -> dict[str, Any]:
    """A 3-epoch one-cycle whose worker crashes in its third epoch, resumed from ``last.ckpt`` by
    a new Learner; and the same fit uninterrupted."""
    from lightning.pytorch.callbacks import Callback

    from tests.helpers import make_learner

    class Crash(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
            if trainer.current_epoch == 2 and i == 1:
                raise RuntimeError("simulated crash")

    options = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_fork", "precision": precision}
    full = make_learner(out / "full", **options)
    full.fit_one_cycle(3, 1e-2)
    crashed = make_learner(out / "resumed", callbacks=[Crash()], **options)
    result: dict[str, Any] = {"full": snapshot(full)}
    try:
        crashed.fit_one_cycle(3, 1e-2)
    except RuntimeError as error:
        result["crash"] = str(error)
    resumed = make_learner(out / "resumed", **options)
    resumed.fit_one_cycle(3, 1e-2, ckpt_path="last")
    result["resumed"] = snapshot(resumed)
    return result


def interrupt(out: Path) -> dict[str, Any]:
    """Ctrl-C as Jupyter sends it (SIGINT to the kernel's process group: the notebook's process and
    its workers) while the workers train; what the Learner holds after, and the workers' fate."""
    import signal
    import threading
    import time

    from lightning.pytorch.callbacks import Callback

    from tests.helpers import make_learner

    class Slow(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
            (out / f"pid{trainer.global_rank}").write_text(str(os.getpid()))
            time.sleep(0.2)

    def press_ctrl_c() -> None:
        while not all((out / f"pid{r}").exists() for r in (0, 1)):
            time.sleep(0.05)
        time.sleep(0.5)
        os.killpg(os.getpgrp(), signal.SIGINT)

    out.mkdir()
    learn = make_learner(out, accelerator="cpu", devices=2, strategy="ddp_fork", callbacks=[Slow()])
    before = snapshot(learn)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    result: dict[str, Any] = {"before": before}
    try:
        learn.fit(50)
    except KeyboardInterrupt as error:
        result["message"] = str(error)
    result["after"] = snapshot(learn)
    result["workers"] = [_process_state(int((out / f"pid{r}").read_text())) for r in (0, 1)]
    return result


def _process_state(pid: int) -> str:
    """``"gone"``, or the state letter of ``/proc/PID/stat`` (``Z``: a zombie, not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def make_tap(out: Path) -> Any:
    """`RankZeroTap`, a callback that makes rank 0 write what it holds at the start and end of
    each fit (defined here so that a notebook can import it)."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    class RankZeroTap(Callback):
        def __init__(self) -> None:
            self.fits = 0  # counted in the notebook's process: a fork starts from its value

        def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
            if trainer.global_rank != 0:
                return
            import copy

            optimizer = trainer.optimizers[0]
            recorder = next(cb for cb in trainer.callbacks if type(cb).__name__ == "Recorder")
            torch.save(
                {
                    "model": {
                        k.removeprefix("model."): v.detach().cpu().clone()
                        for k, v in pl_module.state_dict().items()
                    },
                    "opt": copy.deepcopy(optimizer.state_dict()),
                    "lrs": recorder.lrs.copy(),
                    "losses": recorder.losses.copy(),
                    "pid": os.getpid(),
                    "world_size": trainer.world_size,
                    "rng": torch.get_rng_state(),
                },
                out / f"rank0-fit{self.fits}-{when}.pt",
            )

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._write(trainer, pl_module, "start")

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._write(trainer, pl_module, "end")

    return RankZeroTap()


def main(out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    for precision in PRECISIONS:
        (out / precision).mkdir(parents=True, exist_ok=True)
        run(out / precision, precision)


def run(out: Path, precision: str) -> None:
    import torch

    # Any call into CUDA's initialisation in this (the notebook's) process is recorded.
    cuda_inits: list[str] = []
    lazy_init = torch.cuda._lazy_init

    def record_lazy_init() -> None:
        if os.getpid() == parent:
            cuda_inits.append("torch.cuda._lazy_init")
        lazy_init()

    parent = os.getpid()
    torch.cuda._lazy_init = record_lazy_init
    try:
        _calls(out, precision, parent, cuda_inits)
    finally:
        torch.cuda._lazy_init = lazy_init


def _calls(out: Path, precision: str, parent: int, cuda_inits: list[str]) -> None:
    import torch

    from difflr.policy.suggestions import make_suggestions, valley
    from tests.helpers import make_learner, make_loaders

    tap = make_tap(out)
    learn = make_learner(
        out / "learner",
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        precision=precision,
        callbacks=[tap],
        logger=True,
    )
    record: dict[str, Any] = {"pid": parent}
    record["preview"] = learn.preview_one_cycle(EPOCHS[0], slice(1e-3, 1e-2)).lrs
    learn.freeze_to(1)
    learn.fit_one_cycle(EPOCHS[0], slice(1e-3, 1e-2))
    record["fit0"] = snapshot(learn)
    record["fit0"]["offsets"] = learn.runner.offsets()
    record["fit0"]["epoch"], record["fit0"]["step"] = (
        learn.trainer.current_epoch,
        learn.trainer.global_step,
    )
    tap.fits = 1
    learn.fit_one_cycle(EPOCHS[1], 1e-3)
    record["fit1"] = snapshot(learn)
    record["fit1"]["offsets"] = learn.runner.offsets()

    before = snapshot(learn)
    suggested = learn.lr_find(num_it=LR_FIND_ITERATIONS, show_plot=False)
    after = snapshot(learn)
    lrs, losses = learn.recorder.lrs[:, -1], learn.recorder.losses
    record["lr_find"] = {
        "before": before,
        "after": after,
        "suggested": suggested.valley,
        "expected": make_suggestions([valley], lrs, losses, skip_start=LR_FIND_ITERATIONS // 10)[
            0
        ].valley,
        "n_steps": len(lrs),
    }

    x, y = make_loaders()[1].dataset.tensors
    learn.model.eval()
    with torch.no_grad():
        logits = learn.model(x)
    record["expected_valid_loss"] = float(torch.nn.functional.cross_entropy(logits, y))
    record["expected_probs"] = torch.softmax(logits, dim=1)
    record["validate"] = learn.validate()
    record["preds"], record["targets"] = learn.get_preds()

    tap.fits = 2
    print(f"--- fine_tune {precision} ---", flush=True)
    learn.fine_tune(1, freeze_epochs=1)
    print(f"--- fine_tune {precision} done ---", flush=True)
    record["fine_tune"] = snapshot(learn)
    # A NaN loss at the second step of rank 0 (the NaN guard stops there): its error comes back
    # as itself, and the Learner is as before the call.
    nan_learn = make_learner(
        out / "nan",
        loss_func=NanAtStep(2),
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        precision=precision,
    )
    before = snapshot(nan_learn)
    try:
        nan_learn.fit_one_cycle(1)
    except FloatingPointError as error:
        record["nan_error"] = str(error)
    record["nan_before"], record["nan_after"] = before, snapshot(nan_learn)
    record["resume"] = crash_and_resume(out, precision)
    if precision == PRECISIONS[0]:
        record["interrupt"] = interrupt(out / "interrupt")
    record["log_dirs"] = sorted(p.name for p in (out / "learner" / "lightning_logs").iterdir())
    record["cuda_inits"] = cuda_inits
    torch.save(record, out / "parent.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
