"""A LoRA (peft) model trained with ``strategy="ddp"`` on 2 CPU processes (gloo), with LoRA+.

Run as ``python tests/adapters_ddp_script.py OUTDIR`` (``tests/test_adapters.py`` does, in a
subprocess); Lightning's script launcher starts rank 1 by running this same command again, and
both ranks build the model and data from fixed seeds. Each rank writes ``OUTDIR/rank{r}.pt``: the
model's parameters before and after ``freeze()`` + one cycle + ``unfreeze()`` + one cycle with
``slice`` LRs, and which parameters the optimizer holds state for.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path) -> None:
    import torch

    from tests.helpers import make_learner
    from tests.test_adapters import loaders, lora_classifier

    model = lora_classifier()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    learn = make_learner(
        out,
        model,
        loaders(),
        None,  # the model computes its loss from the labels
        splitter=None,
        lora_plus_ratio=16,
        checkpoint=False,
        strategy="ddp",
        accelerator="cpu",
        devices=2,
    )
    learn.freeze()
    learn.fit_one_cycle(1, 1e-2)
    learn.unfreeze()
    learn.fit_one_cycle(1, slice(1e-3, 1e-2))
    names = {id(p): n for n, p in model.named_parameters()}
    rank = learn.trainer.global_rank
    torch.save(
        {
            "start": start,
            "end": {n: p.detach().clone() for n, p in model.named_parameters()},
            "trainable": trainable,
            "with_state": sorted(names[id(p)] for p in learn.opt.state),
            "lrs": learn.recorder.lrs,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
