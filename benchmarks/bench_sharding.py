"""Sharded fine-tuning (FSDP2 through ``ModelParallelStrategy``): the bytes each rank holds.

A LLaMA-like decoder from a ``transformers`` config (4 layers, hidden 256, vocabulary 2,048;
built here, nothing downloaded) is fine-tuned for one epoch of ``fit_one_cycle`` with the
Learner's default optimizer (AdamW), once in one process (what every DDP rank holds too) and
once sharded on 2 CPU processes (gloo). After the fit each process counts the bytes of what it
holds: its parameters (each rank's own shard under FSDP2), their gradients, and the optimizer
state, unfrozen (``unfreeze()``) and with all but the last layer group frozen (``freeze()``,
whose frozen groups hold no optimizer state and no gradient). The ratio of the sharded run's
per-rank bytes to the one-process run's is about 1/world_size.

Run by ``python -m benchmarks.run --only sharding``; each measurement is this module run as a
script (``python -m benchmarks.bench_sharding OUT single|sharded``) in a process of its own, and
Lightning's launcher starts the second rank of the sharded one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORLD = 2
CASES = ("unfreeze", "freeze")


def make_model() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def held_bytes(learn: Any) -> dict[str, int]:
    """Bytes this process holds for the parameters, their gradients and the optimizer state."""
    from torch.distributed.tensor import DTensor

    def size(t: Any) -> int:
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()

    params = list(learn.model.parameters())
    state = [v for p in params for v in learn.opt.state.get(p, {}).values() if hasattr(v, "numel")]
    return {
        "parameters": sum(size(p) for p in params),
        "gradients": sum(size(p.grad) for p in params if p.grad is not None),
        "optimizer state": sum(size(v) for v in state),
    }


def measure(out: Path, sharded: bool) -> None:
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from difflr import Learner

    torch.set_num_threads(1)
    ids = torch.randint(0, 2048, (64, 32), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids, ids), batch_size=8)

    def lm_loss(logits: Any, labels: Any) -> Any:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    extra: dict[str, Any] = {"accelerator": "cpu", "devices": 1}
    if sharded:
        strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
        extra = {"accelerator": "cpu", "devices": WORLD, "strategy": strategy}
    learn = Learner(
        make_model(),
        (loader, None),
        lm_loss,
        path=out,
        logger=False,
        checkpoint=False,
        enable_progress_bar=False,
        **extra,
    )
    rows = {}
    for case in CASES:
        getattr(learn, case)()
        learn.fit_one_cycle(1, 1e-3)
        rows[case] = held_bytes(learn)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = f"sharded{rank}" if sharded else "single"
    (out / f"{name}.json").write_text(json.dumps(rows))


def _launch(out: Path, mode: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_sharding", str(out), mode],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(cfg: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        _launch(out, "single")
        _launch(out, "sharded")
        single = json.loads((out / "single.json").read_text())
        ranks = [json.loads((out / f"sharded{r}.json").read_text()) for r in range(WORLD)]
    rows, ratios = [], []
    for case in CASES:
        total_single = sum(single[case].values())
        for r, rank in enumerate(ranks):
            total = sum(rank[case].values())
            ratios.append(total / total_single)
            rows.append(
                {
                    "layer groups": "all trainable"
                    if case == "unfreeze"
                    else "freeze(): head only",
                    "rank": r,
                    **{f"{k} MiB (1 process)": single[case][k] / 2**20 for k in single[case]},
                    **{f"{k} MiB (sharded rank)": rank[case][k] / 2**20 for k in rank[case]},
                    "sharded / 1 process": total / total_single,
                }
            )
            log(f"{case} rank {r}: {total / total_single:.3f} of one process")
    worst = max(ratios)
    return {
        "title": "6. Sharded fine-tuning: memory per rank",
        "description": (
            "Bytes of parameters, gradients and optimizer state (AdamW) each process holds "
            "after one epoch of `fit_one_cycle` of a LLaMA-like decoder (4 layers, hidden 256, "
            "vocabulary 2,048: 4.2 M parameters), in one process (as every DDP rank holds) and "
            f"sharded on {WORLD} CPU processes with `ModelParallelStrategy` (FSDP2, gloo); "
            "first with every layer group trainable, then after `freeze()` (the frozen groups "
            "hold no gradient and no optimizer state, sharded or not). Counted from the tensors "
            "(each rank's local shard), not from the process's memory."
        ),
        "tables": [{"rows": rows}],
        "targets": [
            {
                "comparison": (
                    f"parameters + gradients + optimizer state per rank, sharded on {WORLD} "
                    "processes / one process"
                ),
                "target": f"≈ 1/{WORLD} (≤ {0.5 + 0.05:.2f})",
                "measured": f"{min(ratios):.3f}–{worst:.3f}",
                "holds": worst <= 0.55,
            }
        ],
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    measure(Path(sys.argv[1]), sys.argv[2] == "sharded")
