"""The main job: what each fine-tuning recipe is worth, measured as a reviewer would ask, offline,
on 2 CPU cores.

``python -m difflr.demo`` takes a backbone pretrained on rendered font glyphs
(`difflr.demos.backbone`: built once, a few minutes, then cached) and fine-tunes it on the real
handwritten UCI digits (all 10 classes, scikit-learn's copy) from ``--shots`` labelled images per
class. The protocol (`difflr.demos.protocol`): the 1,797 digits are split once into a selection
pool (a third) and an evaluation pool; every hyper-parameter was chosen on draws from the
selection pool (``--select`` chooses them again); every reported number comes from ``--draws``
draws from the evaluation pool (the labelled images of a draw, and the pool's other images as
its test set), the same draws for every method. Inputs are normalised with the pretraining
source's statistics.

The methods, each one difflr call (or a scikit-learn baseline), the recipes all with the same
budget (``--epochs`` epochs of `settings.BATCHES_PER_EPOCH` batches of `settings.BATCH_SIZE`
augmented images) except ``scratch_long``:

- baselines that fine-tune nothing (`difflr.demos.baselines`): 1-NN and logistic regression on
  the pixels, logistic regression on the frozen backbone's features (a linear probe);
- ``scratch`` / ``scratch_long``: a randomly initialised slim ResNet, ``fit_one_cycle`` at the
  same budget / at the budget where it stops improving (chosen on the selection pool);
- ``frozen``: ``freeze(); fit_one_cycle``: the new head (BatchNorm, Linear 128→512, ReLU,
  BatchNorm, Linear 512→10) and the body's BatchNorm layers train, the convolutions do not;
- ``full``: ``fit_one_cycle`` of everything at one LR;
- ``fine_tune``: fastai's ``fine_tune(epochs - 1, base_lr)`` (one frozen epoch, then all);
- ``discriminative``: ``freeze(); lr_find(); fit_one_cycle(1, valley); unfreeze();
  fit_one_cycle(epochs - 1, slice(lr / 10, lr))``;
- ``stage_plan``: the original example's six stages (``fit_stages``), one layer group unfrozen
  per epoch, its LRs scaled by ``lr / 1e-3`` (1e-3 is the original plan's head LR).

Every model is also tested on shifted copies of its test set (`protocol.SHIFTS`: rotated and
sheared; noisy). For each method ``results.json`` holds the accuracy of every draw, its mean, and
the mean paired difference to the best baseline and to ``full`` with a 95% t-interval.
``--lr-sweep`` adds the accuracy of ``full``, ``fine_tune`` and ``discriminative`` at each LR of
`settings.LR_SWEEP` on the same draws. The numbers are in ``docs/results/demo.json`` and the tables of the
README and ``docs/demo.md`` are generated from it by ``docs/gen_tables.py``.

This module runs the job; its flags, grids and committed choices are `difflr.demos.settings`'s,
its phases (draws, selection, evaluation, LR sweep) `difflr.demos.phases`'s.

Examples:
    From Python, with tiny settings (the command line takes the same flags)::

        from difflr.demos.ablation import main
        results = main(["--quick", "--out", "/tmp/difflr_demo"])
        results["runs"]["full"]["accuracies"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from difflr.demos.backbone import pretrained_backbone
from difflr.demos.digits import PIXEL_MEAN, PIXEL_STD, uci_digits
from difflr.demos.glyphs import glyph_classes
from difflr.demos.phases import (
    default_choice,
    evaluate_methods,
    lr_sweep,
    make_tasks,
    select,
    summarise,
)
from difflr.demos.protocol import SHIFTS, split_pools
from difflr.demos.recipes import N_CLASSES, Figures
from difflr.demos.report import format_table, plot_accuracy, plot_lr_sweep
from difflr.demos.settings import RUN_NAMES, DemoError, Settings, parse_args

__all__ = ["cli", "machine", "main", "write_results"]

# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine() -> dict[str, Any]:
    """Where the numbers were measured, and how busy the machine was."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        cpu = found.group(1).strip() if found else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "load_at_start": list(os.getloadavg()),
    }


def write_results(results: dict[str, Any], out: Path) -> None:
    """``results.json``, with lists of numbers on one line each (the indices stay readable)."""
    text = json.dumps(results, indent=2, default=str)
    text = re.sub(
        r"\[\s+([-+\w.,\s]+?)\s+\]",
        lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",")) + "]",
        text,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(text + "\n")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; print the table; write ``results.json`` and figures under ``--out``.

    Args:
        argv: Command-line arguments (``None``: ``sys.argv[1:]``), e.g. ``["--quick"]``.

    Returns:
        The results: ``settings``, ``machine``, ``protocol`` (the pools' indices, every draw's
        labelled images, the normalisation, the shifts), ``pretraining``, ``hyper_parameters``
        (and ``selection`` with ``--select``), ``runs`` (``{name: {accuracies, accuracy,
        accuracy_std, shifted, vs_best_baseline, vs_full, seconds, ...}}``),
        ``best_baseline``, ``lr_sweep`` (with ``--lr-sweep``), ``figures`` and ``seconds``.

    Raises:
        DemoError: A flag the data cannot meet (more ``--shots`` than a digit has).
    """
    settings = parse_args(argv)
    with _threads(settings.threads):
        return _run(settings)


def _run(settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    config = settings.pretrain_config

    def progress(message: str) -> None:
        print(message, flush=True)

    progress(
        f"difflr demo: a slim ResNet pretrained on {len(glyph_classes(config.glyphs))} glyph "
        f"classes, fine-tuned on the UCI digits (10 classes) from {settings.shots} labels per "
        f"class, {settings.draws} draw(s); output in {settings.out}"
    )
    results: dict[str, Any] = {
        "settings": {
            **{
                k: v
                for k, v in dataclasses.asdict(settings).items()
                if k not in ("out", "cache_dir")
            },
            "out": str(settings.out),
            "cache_dir": None if settings.cache_dir is None else str(settings.cache_dir),
            "pretrain_config": config.as_dict(),
            "n_classes": N_CLASSES,
            "chance": 1 / N_CLASSES,
        },
        "machine": machine(),
        "seconds": {},
    }
    backbone = pretrained_backbone(
        config, cache_dir=settings.cache_dir, rebuild=settings.rebuild, progress=True
    )
    keys = ("path", "loaded_from_cache", "source_accuracy", "n_images", "classes")
    results["pretraining"] = {key: backbone.pretraining[key] for key in keys}
    results["pretraining"]["build_seconds"] = {
        "render": backbone.pretraining["render_seconds"],
        "train": backbone.pretraining["train_seconds"],
    }
    results["seconds"]["pretraining"] = time.perf_counter() - started
    progress(
        f"pretrained backbone: {'loaded' if results['pretraining']['loaded_from_cache'] else 'built'}"
        f" in {results['seconds']['pretraining']:.0f} s (source accuracy "
        f"{results['pretraining']['source_accuracy']:.3f} on held-out glyphs)"
    )
    levels, labels = uci_digits()
    pools = split_pools(labels)
    results["protocol"] = {
        **pools.as_dict(),
        "normalisation": {"mean": PIXEL_MEAN, "std": PIXEL_STD, "from": "the pretraining glyphs"},
        "shifts": SHIFTS,
        "confidence": 0.95,
    }
    chosen = default_choice(settings)
    results["hyper_parameters"] = {"chosen_by": "the committed selection (CHOSEN)", **chosen}
    if settings.select:
        phase = time.perf_counter()
        tasks = make_tasks(
            levels, labels, pools.selection, settings.selection_draws, settings, 500, False
        )
        results["protocol"]["selection_draws"] = [t.draw.train.tolist() for t in tasks]
        results["selection"] = select(tasks, backbone, settings, progress)
        chosen = results["selection"]["chosen"]
        results["hyper_parameters"] = {"chosen_by": "this run's selection", **chosen}
        results["seconds"]["selection"] = time.perf_counter() - phase
        write_results(results, settings.out)  # what finished survives a later failure
    phase = time.perf_counter()
    tasks = make_tasks(levels, labels, pools.evaluation, settings.draws, settings, 0, True)
    results["protocol"]["evaluation_draws"] = [t.draw.train.tolist() for t in tasks]
    runs, saved = evaluate_methods(tasks, backbone, chosen, settings)
    for name in RUN_NAMES:
        progress(f"{name}: " + " ".join(f"{a:.3f}" for a in runs[name]["scores"]["clean"]))
    results["best_baseline"] = summarise(runs)
    results["runs"] = runs
    results["seconds"]["evaluation"] = time.perf_counter() - phase
    write_results(results, settings.out)
    if settings.lr_sweep:
        phase = time.perf_counter()
        results["lr_sweep"] = lr_sweep(tasks, backbone, runs, settings, progress)
        results["seconds"]["lr_sweep"] = time.perf_counter() - phase
    figures = Figures(settings.out / "figures")
    figures.enabled = True
    figures.save("accuracy", lambda: plot_accuracy(results))
    if "lr_sweep" in results:
        figures.save("lr_sweep", lambda: plot_lr_sweep(results))
    results["figures"] = sorted(set(saved)) + figures.saved
    results["seconds"]["total"] = time.perf_counter() - started
    results["machine"]["load_at_end"] = list(os.getloadavg())
    write_results(results, settings.out)
    progress("\n" + format_table(results))
    progress(
        f"\n(whole job {results['seconds']['total']:.0f} s, of which "
        f"{results['seconds']['pretraining']:.0f} s for the backbone; load average "
        f"{results['machine']['load_at_start'][0]:.1f} at the start on "
        f"{results['machine']['cores']} cores)\nresults.json and figures/ are in {settings.out}"
    )
    return results


def cli() -> None:
    try:
        main()
    except DemoError as error:
        sys.exit(f"difflr.demo: {error}")


if __name__ == "__main__":
    cli()
