"""The default optimizer: its step time against torch's implementations, and that it keeps
frozen parameters frozen.

1. **The step alone**, on ResNet-18's parameters in the 12 param groups difflr builds (6 layer
   groups x decay/no-decay, discriminative LRs), with fixed random gradients. Each case is built
   afresh every repeat, stepped twice untimed (state allocated, first-call costs out), then
   ``optim_steps`` steps are timed in CPU time; cases run interleaved. The Learner's own
   optimizer is one more case, whatever it defaults to.
2. **Freezing**: after ``learn.freeze()`` and a one-epoch ``fit_one_cycle``, no frozen parameter
   may hold a gradient or optimizer state, or have changed. Whichever implementation the Learner
   defaults to must skip parameters whose gradient is ``None``, weight decay included.
"""

from __future__ import annotations

import functools
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
    torch.manual_seed(0)
    for p in learn.model.parameters():
        p.grad = 1e-3 * torch.randn_like(p)
    groups, lrs = resnet_groups(learn.model), geometric_lrs(LR_LO, LR_HI, 6)

    def factory(opt_class: Callable[..., Any], kwargs: dict[str, bool]) -> Callable[[], Any]:
        # Fresh group dicts: an optimizer writes its defaults (foreach, fused...) into them.
        return lambda: opt_class(torch_param_groups(groups, lrs), lr=LR_HI, **kwargs)

    def prepare(make: Callable[[], torch.optim.Optimizer]) -> Prepare:
        def prepare_run() -> Callable[[], dict[str, Any]]:
            optimizer = make()
            optimizer.step()  # state allocated, first-call costs out of the timing
            optimizer.step()

            def run() -> dict[str, Any]:
                for _ in range(cfg.optim_steps):
                    optimizer.step()
                return {"n_steps": cfg.optim_steps}

            return run

        return prepare_run

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
            row["CPU ms / step"] = median(runs[case], "cpu_ms_per_step")
        if case in runs and baselines[case] in runs:
            ratio = paired(runs, case, baselines[case], "cpu_ms_per_step")
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
            f"`step()` on ResNet-18's 11.2 M parameters in 12 param groups as difflr builds "
            f"them, median of {cfg.optim_repeats} interleaved repeats of {cfg.optim_steps} "
            "steps; *vs single-tensor*: over the same optimizer's single-tensor loop. Then "
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
