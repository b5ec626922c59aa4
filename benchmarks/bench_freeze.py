"""Head-only training (``learn.freeze()``) against full fine-tuning, with ``train_bn`` on and off.

Three measurements per configuration:

* **step time** — median over the steps of a one-epoch ``fit_one_cycle`` (no validation) of the
  CPU time (and wall time) from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer
  step), configurations interleaved and repeated;
* **exact tensor memory** — bytes of gradients and optimizer state after that fit, and bytes of
  the activations autograd saves for the backward pass of one batch (counted with
  ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded);
* **peak process memory** — in a fresh subprocess per configuration (``benchmarks.memory_probe``):
  the rise of the resident set's high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over the resident set just before the fit. This is what the OS
  charges, allocator caching and fragmentation included.

It also checks what the frozen stage must not do: keep gradients of frozen parameters, or
optimizer state for them.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    LR_HI,
    LR_LO,
    ROOT,
    Config,
    Prepare,
    StepTimer,
    digits,
    interleave,
    learner_off_switches,
    loaders,
    resnet18,
    subset,
)

CONFIGS = {
    # name: (freeze, train_bn)
    "full": (False, True),
    "head_only_train_bn": (True, True),
    "head_only_no_bn": (True, False),
}


def make_learner(config: str, n_train: int | None, path: str, callbacks=(), **kwargs: Any):
    """A Learner on ResNet-18 / digits without a validation set, frozen as ``config`` says."""
    from difflr import Learner

    freeze, train_bn = CONFIGS[config]
    train, _ = digits(32)
    train_dl, _ = loaders(subset(train, n_train), None)
    learn = Learner(
        resnet18(),
        (train_dl, None),
        F.cross_entropy,
        train_bn=train_bn,
        path=path,
        callbacks=list(callbacks),
        **learner_off_switches(),
        **kwargs,
    )
    if freeze:
        learn.freeze()
    else:
        learn.unfreeze()
    return learn


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_report(learn) -> dict[str, Any]:
    """What the fit left behind: gradients and optimizer state, for frozen and trainable params."""
    params = list(learn.model.parameters())
    frozen = [p for p in params if not p.requires_grad]
    trainable = [p for p in params if p.requires_grad]
    state = learn.opt.state
    frozen_ids = {id(p) for p in frozen}
    return {
        "params_trainable": sum(p.numel() for p in trainable),
        "params_frozen": sum(p.numel() for p in frozen),
        "frozen_params_with_grad": sum(p.grad is not None for p in frozen),
        "frozen_params_with_optimizer_state": sum(id(p) in frozen_ids for p in state),
        "grad_bytes": tensor_bytes(p.grad for p in params if p.grad is not None),
        "optimizer_state_bytes": tensor_bytes(
            v for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)
        ),
    }


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one training batch (each storage once,
    parameters excluded: they exist anyway)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(seen.values())


def step_contender(cfg: Config, config: str) -> Prepare:
    def prepare() -> Callable[[], dict[str, Any]]:
        path = tempfile.mkdtemp(prefix="difflr_bench_")
        timer = StepTimer()
        learn = make_learner(config, cfg.n_train, path, callbacks=[timer])

        def run() -> dict[str, Any]:
            try:
                learn.fit_one_cycle(1, slice(LR_LO, LR_HI))
            finally:
                shutil.rmtree(path, ignore_errors=True)
            return {
                "step_ms": 1e3 * timer.step("cpu"),
                "step_wall_ms": 1e3 * timer.step("wall"),
                "n_steps": len(timer.batch["cpu"]),
                **state_report(learn),
            }

        return run

    return prepare


def memory_probe(config: str, steps: int, n_train: int | None, threads: int) -> dict[str, Any]:
    """Run ``benchmarks.memory_probe`` in a fresh interpreter and read its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.memory_probe", config, str(steps), str(threads)]
    if n_train is not None:
        cmd.append(str(n_train))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    log("  warm-up (untimed)")
    interleave({c: step_contender(Config(n_train=128), c) for c in CONFIGS}, 1, log=lambda s: None)
    log("  step time: one-epoch fit_one_cycle per configuration, interleaved")
    comparison = interleave(
        {c: step_contender(cfg, c) for c in CONFIGS}, cfg.freeze_repeats, log=log
    )
    result: dict[str, Any] = {"fit": comparison.to_json(), "configs": {}}
    train, _ = digits(32)
    x, y = train.tensors[0][:64], train.tensors[1][:64]
    for config in CONFIGS:
        extras = comparison.extras[config][-1]
        path = tempfile.mkdtemp(prefix="difflr_bench_")
        try:
            learn = make_learner(config, 128, path)
            activations = saved_activation_bytes(learn.model, x, y)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        result["configs"][config] = {
            "step_ms": comparison.extra(config, "step_ms"),
            "step_wall_ms": comparison.extra(config, "step_wall_ms"),
            "saved_activation_bytes_per_batch": activations,
            **{k: v for k, v in extras.items() if not k.startswith("step")},
        }

    log(f"  peak memory: a fresh process per configuration, {cfg.memory_steps} steps each")
    peaks: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for r in range(cfg.memory_repeats):
        names = list(CONFIGS)
        for config in names[r % 3 :] + names[: r % 3]:
            probe = memory_probe(config, cfg.memory_steps, cfg.n_train, torch.get_num_threads())
            peaks[config].append(probe)
            log(
                f"    repeat {r + 1}/{cfg.memory_repeats}  {config:<20s} +{probe['peak_rise_mib']:.0f} MiB"
            )
    for config in CONFIGS:
        result["configs"][config]["peak_rss_rise_mib"] = statistics.median(
            p["peak_rise_mib"] for p in peaks[config]
        )
        result["configs"][config]["memory_probes"] = peaks[config]

    full = result["configs"]["full"]
    for config in ("head_only_train_bn", "head_only_no_bn"):
        c = result["configs"][config]
        c["vs_full"] = {
            "step_time": c["step_ms"] / full["step_ms"],
            "step_time_wall": c["step_wall_ms"] / full["step_wall_ms"],
            "fit_time": comparison.ratios(config, "full"),
            "peak_rss_rise": c["peak_rss_rise_mib"] / full["peak_rss_rise_mib"],
            "saved_activations": c["saved_activation_bytes_per_batch"]
            / full["saved_activation_bytes_per_batch"],
            "grads_plus_optimizer_state": (c["grad_bytes"] + c["optimizer_state_bytes"])
            / (full["grad_bytes"] + full["optimizer_state_bytes"]),
        }
    return result
