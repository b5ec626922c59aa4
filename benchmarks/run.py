"""Run difflr's benchmark suite: one JSON per part, then the Markdown page.

Usage (from the repository root)::

    python -m benchmarks.run            # the full suite, ~15 min on 2 CPU cores
    python -m benchmarks.run --quick    # a ~3 min smoke run of every code path
    python -m benchmarks.run --only fit optim
    python -m benchmarks.run --render   # rewrite docs/benchmarks.md from the JSON (after notes)

A full run writes ``benchmarks/results/<part>.json`` and rewrites ``docs/benchmarks.md``; a
quick run writes both under ``benchmarks/results/quick/`` (ignored by git). ``--only`` reruns
some parts; the page is rendered from every part's JSON in the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import (
    bench_checkpoints,
    bench_fit,
    bench_lr_find,
    bench_optim,
    bench_overhead,
    bench_sharding,
    report,
)
from benchmarks.common import ROOT, Config, machine_info, quiet

PARTS = {
    "fit": bench_fit.run,
    "lr_find": bench_lr_find.run,
    "optim": bench_optim.run,
    "overhead": bench_overhead.run,
    "checkpoints": bench_checkpoints.run,
    "sharding": bench_sharding.run,
}
RESULTS = ROOT / "benchmarks" / "results"


def to_json(value: Any) -> Any:
    """numpy arrays and scalars as lists and Python numbers."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def render(folder: Path, page: Path) -> None:
    files = {name: folder / f"{name}.json" for name in PARTS}
    parts = {name: json.loads(f.read_text()) for name, f in files.items() if f.exists()}
    page.write_text(report.render(parts))
    print(f"page:    {page}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run of every part")
    parser.add_argument("--only", nargs="+", choices=list(PARTS), help="run these parts only")
    parser.add_argument("--render", action="store_true", help="run nothing, rewrite the page")
    args = parser.parse_args(argv)
    folder = RESULTS / "quick" if args.quick else RESULTS
    page = folder / "benchmarks.md" if args.quick else ROOT / "docs" / "benchmarks.md"
    if args.render:
        render(folder, page)
        return

    # With 2 threads on 2 busy cores, OpenMP threads spin at barriers while their partner waits
    # for a core: single steps became up to 20x slower. One thread is stable.
    torch.set_num_threads(1)
    quiet()
    cfg = Config.quick_run() if args.quick else Config()
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.only or PARTS:
        print(f"[{name}]", flush=True)
        start, load, machine = time.perf_counter(), os.getloadavg(), machine_info()
        result = PARTS[name](cfg, log=lambda s: print(s, flush=True))
        result |= {
            "machine": machine,
            "config": vars(cfg),
            "duration_s": time.perf_counter() - start,
            "load_average": {"start": load, "end": os.getloadavg()},
        }
        (folder / f"{name}.json").write_text(json.dumps(result, indent=1, default=to_json) + "\n")
        print(f"[{name}] {result['duration_s']:.0f} s -> {folder / name}.json", flush=True)
    render(folder, page)


if __name__ == "__main__":
    main()
