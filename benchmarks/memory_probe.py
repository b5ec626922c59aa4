"""Peak process memory of a short fit, in a fresh interpreter (used by ``bench_freeze``).

``python -m benchmarks.memory_probe CONFIG STEPS THREADS [N_TRAIN]`` prints one JSON line.

The probe first runs a one-step fit of a tiny model so that every lazily imported module and
one-time allocation of Lightning and difflr is in place, returns freed heap pages to the OS
(``malloc_trim``), resets the kernel's high-water mark of the resident set (writing ``5`` to
``/proc/self/clear_refs``), then runs ``STEPS`` steps of ``fit_one_cycle`` in configuration
``CONFIG`` and reports how far ``VmHWM`` rose above ``VmRSS`` just before the fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) for k in ("VmRSS", "VmHWM")}


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(argv: list[str]) -> None:
    config, steps, threads = argv[0], int(argv[1]), int(argv[2])
    n_train = int(argv[3]) if len(argv) > 3 else None

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    from benchmarks.bench_freeze import make_learner
    from benchmarks.common import (
        LR_HI,
        LR_LO,
        digits,
        learner_off_switches,
        loaders,
        quiet,
        subset,
        swallow_stdout,
        tiny_cnn,
        tiny_splitter,
    )
    from difflr import Learner

    quiet()
    path = tempfile.mkdtemp(prefix="difflr_probe_")
    try:
        with swallow_stdout():
            # Warm-up: imports and one-time allocations of the whole fit path, on a tiny model.
            train, _ = digits(8, channels=1)
            warm = Learner(
                tiny_cnn(),
                loaders(subset(train, 64), None),
                F.cross_entropy,
                splitter=tiny_splitter,
                path=path,
                **learner_off_switches(),
            )
            warm.fit_one_cycle(1, 1e-3)
            del warm
            learn = make_learner(config, n_train, path, limit_train_batches=steps)
            digits(32)
            _trim()
            Path("/proc/self/clear_refs").write_text("5")
            before = _status()
            learn.fit_one_cycle(1, slice(LR_LO, LR_HI))
            after = _status()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    print(
        json.dumps(
            {
                "config": config,
                "steps": steps,
                "rss_before_mib": before["VmRSS"] / 1024,
                "hwm_reset_mib": before["VmHWM"] / 1024,
                "peak_mib": after["VmHWM"] / 1024,
                "peak_rise_mib": (after["VmHWM"] - before["VmRSS"]) / 1024,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
