"""Fine-tune with ``ModelParallelStrategy`` (FSDP2) on 2 CPU processes (gloo) and save what each
rank ends with; also the single-process reference on the same global batches.

Run as ``python tests/sharded_script.py OUTDIR MODEL`` (``tests/test_sharding.py`` does, in a
subprocess), with ``MODEL`` ``blocks`` (a plain ``nn.Module`` with repeated blocks) or ``llama``
(a tiny LLaMA-like decoder from a ``transformers`` config, built here, nothing downloaded).
Lightning's script launcher starts rank 1 by running this same command again with
``LOCAL_RANK=1``. Each rank reads its own ``DistributedSampler(shuffle=False)`` shard; the
reference (``python tests/sharded_script.py OUTDIR MODEL reference``, one process) reads batches
that are the union of the two ranks' batches, so both runs see the same global batches. Each rank
writes ``OUTDIR/rank{r}.pt`` (the reference ``OUTDIR/reference.pt``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

WORLD = 2
KINDS = ("blocks", "llama")
UNEVEN = 65  # items read by get_preds in batches of 8: shards of 33 and 32 items
NAN_AT = 2  # the batch of rank 1 whose loss is NaN in the NaN-guard run
N_ITEMS, BATCH = 64, 4  # per rank: 32 items, 8 batches of 4; the reference: 8 batches of 8
FIRST_LR, SECOND_LR = slice(1e-3, 2e-2), slice(1e-4, 1e-2)


def make_model(kind: str) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=16,
        )
        return LlamaForCausalLM(config)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(self.norm(x))

    return nn.Sequential(nn.Linear(6, 16), *[Block() for _ in range(3)], nn.Linear(16, 3))


def make_dataset(kind: str) -> Any:
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(1)
    if kind == "llama":
        ids = torch.randint(0, 32, (N_ITEMS + 1, 8), generator=g)
        return TensorDataset(ids, ids)  # (input_ids, labels): the model computes its loss
    x = torch.randn(N_ITEMS + 1, 6, generator=g)  # the last item only for get_preds
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())


def learner_args(kind: str) -> dict[str, Any]:
    import torch.nn.functional as F

    from difflr import Learner  # noqa: F401

    def lm_loss(logits: Any, labels: Any) -> Any:
        # The causal-LM loss, as the model computes it: predict token t+1 from tokens <= t.
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )

    return {
        "loss_func": lm_loss if kind == "llama" else F.cross_entropy,
        "logger": False,
        "enable_progress_bar": False,
        "checkpoint": False,
        "wd": 0.01,
    }


def shard_indices(rank: int) -> list[int]:
    """What ``DistributedSampler(shuffle=False)`` gives ``rank`` of ``WORLD``."""
    return list(range(rank, N_ITEMS, WORLD))


def state(learn: Any) -> dict[str, Any]:
    """The full model state (every rank gathers; sharded or not) and the full optimizer state."""
    from difflr.training.sharding import full_state_dict, is_sharded

    if is_sharded(learn.model):
        full = full_state_dict(learn.model, learn.opt)
        return {"model": full["model"], "opt": full["opt"].get("state", {})}
    return {
        "model": {k: v.detach().clone() for k, v in learn.model.state_dict().items()},
        "opt": {
            k: {n: t.clone() if hasattr(t, "clone") else t for n, t in s.items()}
            for k, s in learn.opt.state_dict()["state"].items()
        },
    }


def local(learn: Any) -> dict[str, Any]:
    """What this rank holds: each parameter's local shard, its gradient, its optimizer state."""
    from torch.distributed.tensor import DTensor

    def own(t: Any) -> Any:
        return t.to_local().clone() if isinstance(t, DTensor) else t.detach().clone()

    params = dict(learn.model.named_parameters())
    return {
        "params": {n: own(p) for n, p in params.items()},
        "dtensor": {n: isinstance(p, DTensor) for n, p in params.items()},
        "grads": {n: None if p.grad is None else own(p.grad) for n, p in params.items()},
        "opt_state": {
            n: {k: own(v) if hasattr(v, "shape") else v for k, v in learn.opt.state[p].items()}
            for n, p in params.items()
            if p in learn.opt.state
        },
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
    }


class Interrupt(Exception):
    """Raised by `StopAtEpoch` on every rank: a fit cut short after a checkpoint was written."""


def main(out: Path, reference: bool) -> None:
    import torch

    torch.set_num_threads(1)  # two processes on a two-core machine
    root = out / ("reference" if reference else "sharded")
    results: dict[str, Any] = {kind: run(root / kind, kind, reference) for kind in KINDS}
    for own in (False, True):  # a LightningModule: difflr shards it, or it shards itself
        results[f"module_own={own}"] = run_module(root / f"module{int(own)}", own, reference)
    results["pid"] = os.getpid()
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.save(results, out / ("reference.pt" if reference else f"rank{rank}.pt"))


def run(out: Path, kind: str, reference: bool) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from difflr import Learner, layer_decay

    full = make_dataset(kind)
    ds = Subset(full, range(N_ITEMS))
    valid_dl = DataLoader(ds, batch_size=2 * BATCH)
    if reference:
        # One process, batches of 2*BATCH: rank 0's batch b, then rank 1's batch b.
        order = [
            i
            for b in range(N_ITEMS // WORLD // BATCH)
            for r in range(WORLD)
            for i in shard_indices(r)[b * BATCH : (b + 1) * BATCH]
        ]
        batches = [order[k : k + WORLD * BATCH] for k in range(0, N_ITEMS, WORLD * BATCH)]
        train_dl = DataLoader(ds, batch_sampler=batches)
        extra: dict[str, Any] = {"accelerator": "cpu", "devices": 1}
    else:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=False)
        train_dl = DataLoader(ds, batch_size=BATCH, sampler=sampler)
        strategy = ModelParallelStrategy(
            data_parallel_size=WORLD, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
        extra = {"accelerator": "cpu", "devices": WORLD, "strategy": strategy}

    def learner(**kwargs: Any) -> Any:
        args = {**learner_args(kind), **extra, "path": out, **kwargs}
        return Learner(make_model(kind), (train_dl, valid_dl), **args)

    learn = learner(logger=True)  # TensorBoard under out/lightning_logs, from rank 0
    results: dict[str, Any] = {"groups": [g.name for g in learn.splits]}
    # (a) slice LRs over frozen groups, then (b) a second fit that continues from the first.
    learn.freeze_to(2)
    learn.fit_one_cycle(2, FIRST_LR)
    results["first"] = state(learn)
    results["first_local"] = local(learn)
    results["lrs"] = learn.recorder.lrs
    learn.unfreeze()
    learn.fit_one_cycle(1, SECOND_LR)
    results["second"] = state(learn)
    results["second_local"] = local(learn)
    results["blocks"] = learn.runner.sharding.blocks
    results["validate"] = learn.validate()
    results["preds"] = learn.get_preds()
    # 65 items: Lightning's prediction shards (33 and 32 items) would give rank 0 one batch more.
    results["uneven_preds"] = learn.get_preds(DataLoader(Subset(full, range(UNEVEN)), batch_size=8))
    if kind == "llama":
        # fine_tune (the head, then everything) and a layer_decay LR spec, from where it is.
        learn.fine_tune(1, base_lr=1e-2)
        results["fine_tune"] = state(learn)
        learn.fit_one_cycle(1, layer_decay(1e-2, 0.5))
        results["layer_decay"] = state(learn)
    if reference:
        return results
    # lr_find is a transaction: every rank's shard, optimizer state and RNG come back.
    before, rng = local(learn), torch.get_rng_state()
    results["suggestion"] = learn.lr_find(num_it=12, show_plot=False)
    results["lr_find"] = (before, local(learn), bool(torch.equal(rng, torch.get_rng_state())))
    # save gathers the full state (rank 0 writes it); load puts every rank's shard back.
    learn.save("saved")
    saved = local(learn)
    learn.fit_one_cycle(1, SECOND_LR)
    changed = local(learn)
    learn.load("saved")
    results["save_load"] = (saved, changed, local(learn), state(learn))
    # What is refused on a sharded model, with the reason.
    refusals = {}
    calls = (
        ("predict", lambda: learn.predict(ds[0][0])),
        ("export", learn.export),
        ("lr_find_disk", lambda: learn.lr_find(snapshot="disk", show_plot=False)),
    )
    for what, call in calls:
        try:
            call()
            refusals[what] = None
        except ValueError as error:
            refusals[what] = str(error)
    results["refusals"] = refusals
    if kind != "blocks":
        return results

    # lr_find as the first call: the sweep's Trainer shards the model; the restore puts the
    # initial weights back, into the shards.
    first_call = learner()
    first_call.lr_find(num_it=8, show_plot=False)
    results["lr_find_first"] = (state(first_call)["model"], make_model(kind).state_dict())

    # The NaN guard: rank 1 alone meets a NaN loss; every rank stops at that step.
    class PoisonRankOne(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
            if trainer.global_rank == 1 and i == NAN_AT:
                batch[0][0, 0] = float("nan")

    guarded = learner(callbacks=[PoisonRankOne()], path=out / "nan")
    try:
        guarded.fit_one_cycle(1, FIRST_LR)
        results["nan_guard"] = None
    except FloatingPointError as error:
        results["nan_guard"] = (str(error), local(guarded))
    results["nan_guard_steps"] = len(guarded.recorder.lrs)

    # A fit cut short after its first epoch's checkpoint resumes where the whole fit ends.
    class StopAtEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            if trainer.current_epoch == 1:
                raise Interrupt

    whole = learner(checkpoint=True, path=out / "whole")
    whole.freeze_to(2)
    whole.fit_one_cycle(2, FIRST_LR)
    cut = learner(checkpoint=True, path=out / "cut", callbacks=[StopAtEpoch()])
    cut.freeze_to(2)
    with contextlib.suppress(Interrupt):
        cut.fit_one_cycle(2, FIRST_LR)
    cut.callbacks.clear()
    cut.fit_one_cycle(2, FIRST_LR, ckpt_path="last")
    results["resume"] = (local(whole), local(cut))
    # The same with distributed checkpoints: last.ckpt is a folder of shards, renamed into place.
    folders = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    cut = learner(
        checkpoint=True, path=out / "cut_folder", callbacks=[StopAtEpoch()], strategy=folders
    )
    cut.freeze_to(2)
    with contextlib.suppress(Interrupt):
        cut.fit_one_cycle(2, FIRST_LR)
    folder = out / "cut_folder" / "checkpoints"
    written = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    inside = sorted(p.name for p in (folder / "last.ckpt").iterdir()) if written else []
    cut.callbacks.clear()
    cut.fit_one_cycle(2, FIRST_LR, ckpt_path="last")
    results["resume_folder"] = (local(whole), local(cut), written, inside)
    return results


def run_module(out: Path, own: bool, reference: bool) -> dict[str, Any]:
    """A user's LightningModule around the blocks model: two fits, as `run`'s first two."""
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from difflr import Learner

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model("blocks")

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    class ShardsItself(Module):
        sharded_by_itself = 0

        def configure_model(self) -> None:
            from torch.distributed.fsdp import FSDPModule, fully_shard

            if self.device_mesh is None or isinstance(self.net, FSDPModule):
                return  # one process, or sharded by the previous Trainer
            mesh = self.device_mesh["data_parallel"]
            for block in list(self.net)[1:4]:
                fully_shard(block, mesh=mesh)
            fully_shard(self.net, mesh=mesh)
            type(self).sharded_by_itself += 1

    ds = Subset(make_dataset("blocks"), range(N_ITEMS))
    if reference:
        extra: dict[str, Any] = {"accelerator": "cpu", "devices": 1}
        loader = DataLoader(ds, batch_size=WORLD * BATCH)  # the same global batches as below
    else:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=False)
        loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
        strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
        extra = {"accelerator": "cpu", "devices": WORLD, "strategy": strategy}
    module = ShardsItself() if own else Module()
    learn = Learner(module, (loader, None), path=out, **{**learner_args("blocks"), **extra})
    learn.freeze_to(2)
    learn.fit_one_cycle(1, FIRST_LR)
    first = state(learn)
    learn.unfreeze()
    learn.fit_one_cycle(1, SECOND_LR)
    return {
        "first": first,
        "second": state(learn),
        "local": local(learn),
        "blocks": learn.runner.sharding.blocks,
        "sharded_by_itself": getattr(type(module), "sharded_by_itself", None),
    }


#: Epochs of the fit that rank 1 is killed in, and where: after KILL_EPOCH epochs' checkpoints.
KILL_FIT_EPOCHS, KILL_EPOCH, KILL_BATCH = 3, 2, 3


def kill_or_resume(out: Path, mode: str) -> None:
    """``whole``: a fit of KILL_FIT_EPOCHS epochs; ``kill``: the same fit, whose rank 1 is killed
    (SIGKILL) in epoch KILL_EPOCH; ``resume``: a fresh Learner in fresh processes that resumes it
    from ``last.ckpt`` (a distributed-checkpoint folder). Each rank writes ``OUT/{mode}{r}.pt``."""
    import signal

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from difflr import Learner

    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", "0"))

    class KillRankOne(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
            if trainer.global_rank == 1 and trainer.current_epoch == KILL_EPOCH and i == KILL_BATCH:
                os.kill(os.getpid(), signal.SIGKILL)

    ds = Subset(make_dataset("blocks"), range(N_ITEMS))
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=False)
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    learn = Learner(
        make_model("blocks"), (DataLoader(ds, batch_size=BATCH, sampler=sampler), None),
        **{**learner_args("blocks"), "checkpoint": True},
        path=out / ("whole" if mode == "whole" else "killed"),
        callbacks=[KillRankOne()] if mode == "kill" else [],
        accelerator="cpu", devices=WORLD, strategy=strategy,
    )  # fmt: skip
    learn.freeze_to(2)
    learn.fit_one_cycle(KILL_FIT_EPOCHS, FIRST_LR, ckpt_path="last" if mode == "resume" else None)
    torch.save(local(learn), out / f"{mode}{rank}.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if len(sys.argv) > 2 and sys.argv[2] in ("whole", "kill", "resume"):
        kill_or_resume(Path(sys.argv[1]), sys.argv[2])
    else:
        main(Path(sys.argv[1]), len(sys.argv) > 2 and sys.argv[2] == "reference")
