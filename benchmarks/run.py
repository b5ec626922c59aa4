"""Run difflr's benchmark suite and write the results.

Usage (from the repository root)::

    python -m benchmarks.run            # the full suite, ~10-15 min on 2 CPU cores
    python -m benchmarks.run --quick    # a ~1-2 min smoke run of every code path
    python -m benchmarks.run --only fit lr_find --out /tmp/bench.json
    python -m benchmarks.run --render   # rewrite docs/benchmarks.md from latest.json

A full run writes ``benchmarks/results/latest.json`` and rewrites ``docs/benchmarks.md``; a
quick run writes ``benchmarks/results/quick.json`` and leaves the docs alone (unless ``--docs``
is given). ``--only`` runs some parts and merges them into the existing JSON at ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # `python benchmarks/run.py`: import from the repository root, not from benchmarks/ (whose
    # module names must not shadow the standard library's).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from benchmarks import bench_fit, bench_freeze, bench_lr_find, bench_overhead, report
from benchmarks.common import ROOT, Config, machine_info, quiet

PARTS = {
    "fit": bench_fit.run,
    "lr_find": bench_lr_find.run,
    "freeze": bench_freeze.run,
    "overhead": bench_overhead.run,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else str(value)
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run of every part")
    parser.add_argument("--only", nargs="+", choices=list(PARTS), help="run these parts only")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/)")
    parser.add_argument(
        "--docs",
        type=Path,
        help="Markdown page to write (default docs/benchmarks.md for a full run, none for --quick)",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write the Markdown page")
    parser.add_argument(
        "--render",
        action="store_true",
        help="run nothing: rewrite the Markdown page from the JSON at --out (after editing notes)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every contender (default 1: stable on a shared machine)",
    )
    args = parser.parse_args(argv)

    cfg = Config.quick_run() if args.quick else Config()
    out = args.out or ROOT / "benchmarks" / "results" / (
        "quick.json" if args.quick else "latest.json"
    )
    docs = (
        None
        if args.no_docs
        else (args.docs or (None if args.quick else ROOT / "docs" / "benchmarks.md"))
    )
    parts = args.only or list(PARTS)

    if args.render:
        results = json.loads(out.read_text())
        target = docs or ROOT / "docs" / "benchmarks.md"
        target.write_text(report.render(results))
        print(f"page:    {target}")
        return results

    torch.set_num_threads(args.threads)
    quiet()
    results: dict[str, Any] = {}
    if args.only and out.exists():
        results = json.loads(out.read_text())  # merge into the previous run's parts
    results["machine"] = machine_info()
    results["config"] = vars(cfg)
    results.setdefault("runs", {})

    start = time.perf_counter()
    for name in parts:
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        results[name] = PARTS[name](cfg, log=lambda s: print(s, flush=True))
        results["runs"][name] = {
            "date_utc": results["machine"]["date_utc"],
            "duration_s": time.perf_counter() - t0,
            "load_average_at_start": list(load0),
            "load_average_at_end": list(os.getloadavg()),
        }
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
    results["duration_s"] = time.perf_counter() - start

    results = _jsonable(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {out}")
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(report.render(results))
        print(f"page:    {docs}")
    return results


if __name__ == "__main__":
    main()
