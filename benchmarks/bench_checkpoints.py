"""What the checksum of every file difflr writes costs, per checkpoint: on a ResNet-18-sized
state (weights and AdamW state, ~134 MB) and a tiny one (the tests' 3-group MLP).

For each state: the save as difflr does it (`atomic_save`: temp file, ``fsync``, rename, with
the checksum) against the same atomic save without the checksum, and the read (`safe_load`:
``torch.load(weights_only=True)`` and the check) against ``torch.load(weights_only=True)`` alone;
the checksum itself is timed apart. Wall time (the save waits for the disk), median of the
repeats, files in a temp folder of the system's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import Config, resnet18


def _state(model: nn.Module) -> dict[str, Any]:
    """What a Learner's checkpoint holds for ``model``: its weights and an AdamW state."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}


def _tiny() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 3)
    )


def _paired_ms(with_: Callable[[], Any], without: Callable[[], Any], repeats: int) -> list[float]:
    """Median wall ms of ``with_`` and of ``without``, run back to back in each repeat (so a
    change of the machine's load hits both alike)."""
    with_(), without()  # warm-up: page cache, allocator
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for k, fn in enumerate((with_, without)):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def measure(state: dict[str, Any], folder: Path, repeats: int) -> dict[str, float]:
    from difflr.utils.files import atomic_save, atomic_write, checksum, safe_load

    file = folder / "state.ckpt"
    plain = folder / "plain.ckpt"
    atomic_write(plain, lambda handle: torch.save(state, handle))
    atomic_save(state, file)
    mb = file.stat().st_size / 1e6
    checksum_ms, _ = _paired_ms(lambda: checksum(state), lambda: None, repeats)
    save_ms, save_without_ms = _paired_ms(
        lambda: atomic_save(state, file),
        lambda: atomic_write(plain, lambda h: torch.save(state, h)),
        repeats,
    )
    load_ms, load_without_ms = _paired_ms(
        lambda: safe_load(file),
        lambda: torch.load(plain, map_location="cpu", weights_only=True),
        repeats,
    )
    return {
        "mb": mb,
        "checksum_ms": checksum_ms,
        "checksum_ms_per_mb": checksum_ms / mb,
        "save_ms": save_ms,
        "save_without_ms": save_without_ms,
        "load_ms": load_ms,
        "load_without_ms": load_without_ms,
        "save_extra_pct": 100 * (save_ms / save_without_ms - 1),
        "load_extra_pct": 100 * (load_ms / load_without_ms - 1),
        "checksum_pct_of_save": 100 * checksum_ms / save_without_ms,
        "checksum_pct_of_load": 100 * checksum_ms / load_without_ms,
    }


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    quick = cfg.fit_repeats < 3
    sizes = {"resnet18": (resnet18, 2 if quick else 7), "tiny": (_tiny, 10 if quick else 101)}
    found: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="difflr_bench_ckpt_") as folder:
        for name, (make, repeats) in sizes.items():
            torch.manual_seed(0)
            found[name] = measure(_state(make()), Path(folder), repeats)
            log(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in found[name].items()))
    rows = [
        {
            "state": name,
            "file MB": round(r["mb"], 3),
            "checksum ms": round(r["checksum_ms"], 3),
            "checksum % of save, of load": (
                f"{r['checksum_pct_of_save']:.1f}, {r['checksum_pct_of_load']:.1f}"
            ),
            "save ms (without)": f"{r['save_ms']:.2f} ({r['save_without_ms']:.2f})",
            "save +%": round(r["save_extra_pct"], 1),
            "load ms (without)": f"{r['load_ms']:.2f} ({r['load_without_ms']:.2f})",
            "load +%": round(r["load_extra_pct"], 1),
        }
        for name, r in found.items()
    ]
    return {
        "title": "5. The checksum of every checkpoint",
        "description": (
            "Every dict difflr writes (checkpoints, saved states, the lr_find disk snapshot, the "
            "backbone cache) carries a CRC-32 of its tensors and plain values, verified on every "
            "read. Cost per checkpoint, wall time, median of the repeats (run back to back): "
            "the checksum alone, and as a share of the save without it and of the read without "
            "it; then the atomic save with the checksum against the same save without, the read "
            "with the check against torch.load(weights_only=True) alone. The save waits for the "
            "disk (fsync), so those two differ from run to run more than the checksum costs on "
            "a small state; the checksum's own time does not depend on the disk."
        ),
        "tables": [{"caption": "", "rows": rows}],
        "targets": [],
        "runs": found,
    }
