"""Profile one contender of the benchmarks with cProfile, to see where its time goes.

Usage (from the repository root)::

    python -m benchmarks.profiling tiny-difflr           # Learner.fit_one_cycle on the tiny CNN
    python -m benchmarks.profiling tiny-lightning        # the hand-written module, same task
    python -m benchmarks.profiling tiny-callbacks        # hand-written module + difflr callbacks
    python -m benchmarks.profiling resnet-difflr --epochs 1
    python -m benchmarks.profiling lr-find-difflr --top 40 --sort cumulative

Prints the top functions by own time (``--sort tottime``, the default) or cumulative time, and
writes the raw profile to ``--out`` (load it with ``pstats`` or snakeviz).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    # `python benchmarks/profiling.py`: import from the repository root, not from benchmarks/ (whose
    # module names must not shadow the standard library's).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from benchmarks import bench_fit, bench_lr_find, bench_overhead
from benchmarks.common import Config, quiet, swallow_stdout

TARGETS = {
    "tiny-difflr": lambda cfg: bench_overhead.difflr_contender(cfg),
    "tiny-lightning": lambda cfg: bench_overhead.lightning_contender(cfg),
    "tiny-callbacks": lambda cfg: bench_overhead.lightning_contender(cfg, difflr_callbacks=True),
    "tiny-plain": lambda cfg: bench_overhead.plain_contender(cfg),
    "resnet-difflr": lambda cfg: bench_fit.difflr_contender(cfg),
    "resnet-lightning": lambda cfg: bench_fit.lightning_contender(cfg),
    "resnet-difflr-defaults": lambda cfg: bench_fit.difflr_contender(cfg, defaults=True),
    "resnet-lightning-defaults": lambda cfg: bench_fit.lightning_contender(cfg, defaults=True),
    "lr-find-difflr": lambda cfg: bench_lr_find.difflr_contender(cfg),
    "lr-find-lightning": lambda cfg: bench_lr_find.lightning_contender(cfg),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=list(TARGETS))
    parser.add_argument("--epochs", type=int, help="epochs (tiny: default 10; resnet: 2)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/difflr_benchmark.prof"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    quiet()
    cfg = Config()
    if args.epochs:
        cfg = replace(cfg, epochs=args.epochs, tiny_epochs=args.epochs)
    prepare = TARGETS[args.target](cfg)
    with swallow_stdout():
        prepare()()  # warm-up: imports and first-call costs stay out of the profile
    run = prepare()
    profiler = cProfile.Profile()
    with swallow_stdout():
        profiler.enable()
        run()
        profiler.disable()
    profiler.dump_stats(args.out)
    stats = pstats.Stats(profiler)
    stats.sort_stats(args.sort).print_stats(args.top)
    print(f"profile written to {args.out}")


if __name__ == "__main__":
    main()
