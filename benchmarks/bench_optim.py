"""The default optimizer: its step time against torch's implementations, and that it keeps
frozen parameters frozen.

1. **The step alone**, on ResNet-18's parameters in the 12 param groups difflr builds (6 layer
   groups x decay/no-decay, discriminative LRs). Each case is built afresh every repeat and
   stepped twice untimed (state allocated, first-call costs out); then ``optim_steps`` times a
   backward pass on 16 images (untimed) and ``optimizer.step()`` (timed, CPU time); cases run
   interleaved. Timed right after a backward pass, as in training: on a model at rest the
   single-tensor step took anywhere from 20 to 48 ms depending on what the process had
   allocated before (the allocator's state), while the fused step hardly moved. The Learner's
   own optimizer is one more case, whatever it defaults to.
2. **Freezing**: after ``learn.freeze()`` and a one-epoch ``fit_one_cycle``, no frozen parameter
   may hold a gradient or optimizer state, or have changed. Whichever implementation the Learner
   defaults to must skip parameters whose gradient is ``None``, weight decay included."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    LEARNER_OFF,
    LR_HI,
    LR_LO,
    Config,
    Prepare,
    digits,
    geometric_lrs,
    implementation,
    interleave,
    loaders,
    median,
    paired,
    resnet18,
    resnet_groups,
    subset,
    swallow_stdout,
    torch_param_groups,
)

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD(momentum=0.9)": functools.partial(torch.optim.SGD, momentum=0.9),
    "RAdam": torch.optim.RAdam,
}
IMPLEMENTATIONS: dict[str, dict[str, bool]] = {
    "torch's default": {},  # foreach=None: the single-tensor loop for CPU tensors
    "single-tensor": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def make_learner(n_train: int, **kwargs: Any) -> Any:
    from difflr import Learner

    data = loaders(subset(digits(32)[0], n_train), None)
    return Learner(resnet18(), data, F.cross_entropy, **LEARNER_OFF, **kwargs)


def step_times(cfg: Config, log: Callable[[str], None]) -> list[dict[str, Any]]:
    learn = make_learner(64)
    model = learn.model.train()
    groups, lrs = resnet_groups(model), geometric_lrs(LR_LO, LR_HI, 6)
    x, y = (t[:16] for t in digits(32)[0].tensors)

    def backward() -> None:
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(model(x), y).backward()

    def factory(opt_class: Callable[..., Any], kwargs: dict[str, bool]) -> Callable[[], Any]:
        # Fresh group dicts: an optimizer writes its defaults (foreach, fused...) into them.
        return lambda: opt_class(torch_param_groups(groups, lrs), lr=LR_HI, **kwargs)

    def prepare(make: Callable[[], torch.optim.Optimizer]) -> Prepare:
        def prepare_run() -> Callable[[], dict[str, Any]]:
            optimizer = make()
            for _ in range(2):  # state allocated, first-call costs out of the timing
                backward()
                optimizer.step()

            def run() -> dict[str, Any]:
                times = []
                for _ in range(cfg.optim_steps):
                    backward()
                    start = time.process_time()
                    optimizer.step()
                    times.append(time.process_time() - start)
                return {"n_steps": cfg.optim_steps, "step_ms": 1e3 * statistics.median(times)}

            return run

        return prepare_run

    backward()  # gradients for the check that an implementation exists
    makers = {
        (name, impl): factory(opt_class, kwargs)
        for name, opt_class in OPTIMIZERS.items()
        for impl, kwargs in IMPLEMENTATIONS.items()
    }
    difflr, difflr_name = implementation(learn.opt), "difflr's default, `Learner(...).opt`"
    makers[(difflr_name, difflr["name"])] = lambda: learn.opt
    rows, cases, baselines = {}, {}, {}
    for (name, impl), make in makers.items():
        case = f"{name} / {impl}"
        rows[case] = {"optimizer": name, "implementation": impl}
        # The Learner's optimizer is compared with the single-tensor loop of its class.
        baselines[case] = f"{difflr['optimizer'] if name == difflr_name else name} / single-tensor"
        try:
            make().step()
            cases[case] = prepare(make)
        except (TypeError, RuntimeError, ValueError) as error:  # no such implementation
            rows[case]["CPU ms / step"] = f"unsupported ({type(error).__name__})"
    runs = interleave(cases, cfg.optim_repeats, log)
    for case, row in rows.items():
        if case in runs:
            row["CPU ms / step"] = median(runs[case], "step_ms")
        if case in runs and baselines[case] in runs:
            ratio = paired(runs, case, baselines[case], "step_ms")
            row["vs single-tensor"] = ratio["paired_median"]
    return list(rows.values())


def freeze_check(cfg: Config, train_bn: bool) -> dict[str, Any]:
    learn = make_learner(cfg.freeze_train, train_bn=train_bn)
    learn.freeze()
    frozen = [p for p in learn.model.parameters() if not p.requires_grad]
    before = [p.detach().clone() for p in frozen]
    with swallow_stdout():
        learn.fit_one_cycle(1, slice(LR_LO, LR_HI))
    return {
        "configuration": f"`freeze()`, `train_bn={train_bn}`",
        "optimizer": implementation(learn.opt)["name"],
        "trainable params": sum(p.numel() for p in learn.model.parameters() if p.requires_grad),
        "frozen param tensors": len(frozen),
        "with a gradient": sum(p.grad is not None for p in frozen),
        "with optimizer state": sum(len(learn.opt.state.get(p, {})) > 0 for p in frozen),
        "changed": sum(not torch.equal(p, b) for p, b in zip(frozen, before)),
    }


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    steps = step_times(cfg, log)
    frozen = [freeze_check(cfg, train_bn) for train_bn in (True, False)]
    bad = [
        sum(row[key] for row in frozen)
        for key in ("with a gradient", "with optimizer state", "changed")
    ]
    return {
        "title": "3. The default optimizer",
        "description": (
            "`optimizer.step()` on ResNet-18's 11.2 M parameters in 12 param groups as difflr "
            "builds them, timed right after a backward pass (on 16 images) as in training; "
            f"median of {cfg.optim_repeats} interleaved repeats of {cfg.optim_steps} steps; "
            "*vs single-tensor*: over the same optimizer's single-tensor loop (paired). Then "
            f"freezing: `learn.freeze()` and one epoch of `fit_one_cycle` on {cfg.freeze_train} "
            "images with the Learner's default optimizer; frozen parameter tensors afterwards."
        ),
        "difflr_optimizer": implementation(make_learner(64).opt),
        "tables": [{"rows": steps}, {"caption": "Freezing", "rows": frozen}],
        "targets": [
            {
                "comparison": "`freeze()` with the default optimizer: frozen params with a "
                "gradient / with optimizer state / changed after a fit",
                "target": "0 / 0 / 0",
                "measured": " / ".join(map(str, bad)),
                "holds": not any(bad),
            }
        ],
    }
