"""Fine-tune a LLaMA-like decoder sharded over 2 processes with FSDP2, with difflr's workflow.

Runs on CPU (gloo) as it is; on GPUs pass accelerator="gpu".

    python docs/examples/sharded_fine_tune.py                         # Lightning starts rank 1
    torchrun --nproc-per-node 2 docs/examples/sharded_fine_tune.py    # or any launcher

Every rank runs this whole program. The model is built from a config (nothing is downloaded);
with real weights, load them the same way on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from difflr import Learner


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss: token t+1 predicted from the tokens up to t."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def main(path: Path) -> None:
    torch.manual_seed(0)  # the same model and data on every rank
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (256, 32))
    train_dl = DataLoader(TensorDataset(ids[:192], ids[:192]), batch_size=8, shuffle=True)
    valid_dl = DataLoader(TensorDataset(ids[192:], ids[192:]), batch_size=16)

    strategy = ModelParallelStrategy(
        data_parallel_size=2,  # processes that each hold a shard (all of them)
        tensor_parallel_size=1,  # difflr shards along data-parallel only
        save_distributed_checkpoint=False,  # last.ckpt: the full state, gathered on rank 0
    )
    learn = Learner(
        model, (train_dl, valid_dl), lm_loss, path=path, logger=False,
        accelerator="cpu", devices=2, strategy=strategy,
    )  # fmt: skip

    learn.freeze()  # the head only: the frozen groups hold no gradient and no optimizer state
    learn.fit_one_cycle(1, 1e-3)
    learn.unfreeze()
    suggestion = learn.lr_find(num_it=20, show_plot=False)  # every rank's shard restored exactly
    learn.fit_one_cycle(2, slice(1e-4, 1e-3))
    learn.save("final")  # gathered from every rank: call it on every rank (rank 0 writes)
    result = learn.validate()
    if learn.trainer.is_global_zero:
        print(f"lr_find: {suggestion}; valid_loss {result['valid_loss']:.3f}")
        print(f"saved {path / 'models' / 'final.pth'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("sharded_run"))
