"""The main job's results as tables and figures: the terminal's table, the Markdown tables of the
README and the docs (``docs/gen_tables.py`` writes them from the committed ``results.json``), the
accuracy figure and the LR sweep's."""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "LABELS",
    "format_table",
    "letters_table",
    "lr_sweep_table",
    "machine_note",
    "main_table",
    "plot_accuracy",
    "plot_lr_sweep",
    "selection_table",
    "sweep_of",
    "timing_note",
]

#: How each method is named in the tables and figures.
LABELS = {
    "knn_pixels": "1-NN on pixels",
    "logreg_pixels": "logistic regression on pixels",
    "linear_probe": "linear probe (frozen features)",
    "scratch": "scratch",
    "scratch_long": "scratch, longer budget",
    "frozen": "frozen body (head + norms train)",
    "full": "full fine-tuning, one LR",
    "fine_tune": "`fine_tune`",
    "discriminative": "`lr_find` + discriminative LRs",
    "stage_plan": "six-stage plan (gradual unfreezing)",
}
_SHIFT_ORDER = ("rotated", "noisy")
_SWEEP_RECIPES = ("full", "fine_tune", "discriminative")


def sweep_of(results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The LR sweep and where it was measured: ``--lr-sweep``'s on the evaluation draws, else the
    same recipes' LR grid on the selection draws (``--select`` tries the same five LRs)."""
    if "lr_sweep" in results:
        return results["lr_sweep"], "evaluation"
    from difflr.demos.protocol import paired_interval

    lr_grid = results["selection"]["lr"]
    recipes = {}
    for name in _SWEEP_RECIPES:
        recipes[name] = {}
        for lr, scores in sorted(lr_grid[name].items(), key=lambda item: float(item[0])):
            mean = sum(scores) / len(scores)
            var = sum((a - mean) ** 2 for a in scores) / max(len(scores) - 1, 1)
            recipes[name][lr] = {
                "accuracies": scores,
                "accuracy": mean,
                "accuracy_std": math.sqrt(var),
            }
    full = recipes["full"]
    vs_full = {
        name: {
            lr: paired_interval(points[lr]["accuracies"], full[lr]["accuracies"]) for lr in points
        }
        for name, points in recipes.items()
        if name != "full"
    }
    lrs = [float(lr) for lr in recipes["full"]]
    return {"lrs": lrs, "recipes": recipes, "vs_full": vs_full}, "selection"


def _ci(interval: dict[str, float | None]) -> str:
    """``+0.012 [+0.004, +0.020]``; no bounds below 2 draws."""
    if interval["low"] is None or (
        isinstance(interval["low"], float) and math.isnan(interval["low"])
    ):
        return f"{interval['mean']:+.3f}"
    return f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def _hyper(name: str, run: dict[str, Any]) -> str:
    parts = []
    if run.get("lr") is not None:
        parts.append(f"lr {run['lr']:g}")
    if run.get("c") is not None:
        parts.append(f"C {run['c']:g}")
    if name == "scratch_long":
        parts.append(f"{run['steps']} steps")
    return ", ".join(parts)


def format_table(results: dict[str, Any]) -> str:
    """The runs as a plain-text table for the terminal: method, accuracy, the paired differences
    to the best baseline and to full fine-tuning (95% CI), the shifted test sets, time."""
    runs = results["runs"]
    draws = len(next(iter(runs.values()))["accuracies"])
    best = results["best_baseline"]
    header = (
        "method",
        f"accuracy (mean ± std, {draws} draws)",
        f"vs {best} [95% CI]",
        "vs full [95% CI]",
        *_SHIFT_ORDER,
        "time",
        "hyper-parameters",
    )
    rows = [header]
    for name, run in runs.items():
        rows.append(
            (
                name,
                f"{run['accuracy']:.3f} ± {run['accuracy_std']:.3f}",
                "" if name == best else _ci(run["vs_best_baseline"]),
                "" if name == "full" else _ci(run["vs_full"]),
                *(f"{run['shifted_accuracy'][k]:.3f}" for k in _SHIFT_ORDER),
                f"{run['seconds']:.1f} s",
                _hyper(name, run),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main_table(results: dict[str, Any]) -> str:
    """The results table in Markdown: every method with its hyper-parameters, accuracy, paired
    differences (95% CI), shifted accuracies and time of a run."""
    runs = results["runs"]
    draws = len(runs["full"]["accuracies"])
    best = results["best_baseline"]
    lines = [
        f"| method | chosen on the selection pool | accuracy (mean ± sd, {draws} draws) "
        f"| vs best baseline ({LABELS[best]}), 95% CI | vs full fine-tuning, 95% CI "
        "| rotated | noisy | s per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {LABELS[name]} | {_hyper(name, run)} "
            f"| {run['accuracy']:.3f} ± {run['accuracy_std']:.3f} "
            f"| {'(best baseline)' if name == best else _ci(run['vs_best_baseline'])} "
            f"| {'' if name == 'full' else _ci(run['vs_full'])} "
            f"| {run['shifted_accuracy']['rotated']:.3f} | {run['shifted_accuracy']['noisy']:.3f} "
            f"| {run['seconds']:.1f} |"
        )
    return "\n".join(lines)


def lr_sweep_table(results: dict[str, Any]) -> str:
    """The LR sweep in Markdown: each recipe's mean accuracy at each LR, then the paired
    difference of ``fine_tune`` and the discriminative recipe to full fine-tuning at that LR."""
    sweep, _ = sweep_of(results)
    lrs = list(sweep["recipes"]["full"])
    head = "| recipe | " + " | ".join(f"lr {float(lr):g}" for lr in lrs) + " |"
    lines = [head, "| --- |" + " --- |" * len(lrs)]
    for name, points in sweep["recipes"].items():
        cells = [f"{points[lr]['accuracy']:.3f} ± {points[lr]['accuracy_std']:.3f}" for lr in lrs]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    for name, intervals in sweep["vs_full"].items():
        cells = [_ci(intervals[lr]) for lr in lrs]
        lines.append(f"| {LABELS[name]} − full, 95% CI | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_table(results: dict[str, Any]) -> str:
    """The selection grid in Markdown: each recipe's mean accuracy on the selection draws at each
    LR it was tried at (the chosen one in bold), the scratch budgets and the regressions' C."""
    selection = results["selection"]
    chosen = selection["chosen"]
    lines = ["| method | tried (mean accuracy on the selection draws) |", "| --- | --- |"]

    def cells(grid: dict[str, list[float]], pick: float, unit: str) -> str:
        out = []
        for key in sorted(grid, key=float):
            text = f"{unit} {float(key):g}: {sum(grid[key]) / len(grid[key]):.3f}"
            out.append(f"**{text}**" if float(key) == pick else text)
        return ", ".join(out)

    for name, grid in selection["lr"].items():
        lines.append(f"| {LABELS[name]} | {cells(grid, chosen[name]['lr'], 'lr')} |")
    budget = cells(selection["budget"], chosen["scratch_long"]["budget"], "x")
    lines.append(f"| {LABELS['scratch']}, budget | {budget} |")
    for name, grid in selection["c"].items():
        lines.append(f"| {LABELS[name]} | {cells(grid, chosen[name]['c'], 'C')} |")
    return "\n".join(lines)


def letters_table(letters: dict[str, Any]) -> str:
    """The transfer recipes of a ``--source letters`` run against that run's best baseline."""
    runs = letters["runs"]
    best = letters["best_baseline"]
    lines = [
        f"| method, letters-only backbone | accuracy | vs best baseline ({LABELS[best]}), 95% CI "
        "| rotated | noisy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in ("linear_probe", "frozen", "full", "fine_tune", "discriminative", "stage_plan"):
        run = runs[name]
        lines.append(
            f"| {LABELS[name]} | {run['accuracy']:.3f} ± {run['accuracy_std']:.3f} "
            f"| {'(best baseline)' if name == best else _ci(run['vs_best_baseline'])} "
            f"| {run['shifted_accuracy']['rotated']:.3f} | {run['shifted_accuracy']['noisy']:.3f} |"
        )
    return "\n".join(lines)


def machine_note(results: dict[str, Any]) -> str:
    """Where and how long: the machine, the load it ran under, the wall time of each phase."""
    machine = results["machine"]
    seconds = results["seconds"]
    phases = ", ".join(
        f"{name.replace('_', ' ')} {seconds[name] / 60:.1f} min"
        for name in ("selection", "evaluation", "lr_sweep")
        if name in seconds
    )
    build = results["pretraining"]["build_seconds"]
    loads = f"{machine['load_at_start'][0]:.1f} at the start"
    peaks = [machine["load_at_start"][0]]
    if "selection_load_at_start" in machine:
        loads = f"{machine['selection_load_at_start'][0]:.1f} at the selection's start, " + loads
        peaks.append(machine["selection_load_at_start"][0])
    if "load_at_end" in machine:
        loads += f" and {machine['load_at_end'][0]:.1f} at the end"
        peaks.append(machine["load_at_end"][0])
    workers = results["settings"].get("workers", 1)
    busy = max(peaks) > machine["cores"] / 2
    return (
        f"Measured on {machine['cpu']} ({machine['cores']} cores, torch {machine['torch']}, "
        f"{workers} worker process(es) of {machine['threads']} thread each) under a load average "
        f"of {loads}"
        + (
            ": other jobs shared the cores, so the times here are longer than a quiet machine's. "
            if busy
            else ". "
        )
        + f"Wall time: {phases}; the pretraining, built once and cached, took "
        f"{(build['render'] + build['train']) / 60:.1f} min."
    )


def timing_note(run: dict[str, Any], committed: dict[str, Any]) -> str:
    """How long the default command took on a quiet machine from an empty cache (``run``: its
    ``results.json``), and whether its accuracies are the ``committed`` results'."""
    machine, seconds, settings = run["machine"], run["seconds"], run["settings"]
    build = run["pretraining"]["build_seconds"]
    built = not run["pretraining"]["loaded_from_cache"]
    same = all(
        run["runs"][name]["accuracies"] == committed["runs"][name]["accuracies"]
        for name in run["runs"]
    )
    return (
        f"`python -m difflr.demo` with an empty cache, on a quiet {machine['cpu']} "
        f"({machine['cores']} cores, load average {machine['load_at_start'][0]:.1f} at the start, "
        f"{settings['workers']} worker processes): {seconds['total'] / 60:.1f} min in all, of "
        + (
            f"which {(build['render'] + build['train']) / 60:.1f} min building the backbone "
            f"(rendering {build['render'] / 60:.1f}, training {build['train'] / 60:.1f}) and "
            if built
            else "which "
        )
        + f"{seconds['evaluation'] / 60:.1f} min for the {settings['draws']}-draw evaluation (the "
        f"whole run once the backbone is cached). Its accuracies "
        + (
            "equal the committed results' bit for bit."
            if same
            else "differ from the committed ones."
        )
    )


def plot_accuracy(results: dict[str, Any]) -> Any:
    """Each method's mean accuracy on the clean and the shifted test sets, one marker series
    per test set, with the clean accuracy's 95% interval of the mean."""
    import matplotlib.pyplot as plt
    from scipy import stats

    runs = results["runs"]
    names = list(runs)
    figure, axis = plt.subplots(figsize=(7.0, 4.4))
    n = len(runs[names[0]]["accuracies"])
    t = float(stats.t.ppf(0.975, n - 1)) if n > 1 else 0.0
    for offset, key in zip((0.0, 0.2, -0.2), ("clean", *_SHIFT_ORDER)):
        if key == "clean":
            means = [runs[name]["accuracy"] for name in names]
            errors = [t * runs[name]["accuracy_std"] / math.sqrt(n) for name in names]
        else:
            means = [runs[name]["shifted_accuracy"][key] for name in names]
            errors = None
        axis.errorbar(
            means,
            [i + offset for i in range(len(names))],
            xerr=errors,
            fmt="o" if key == "clean" else "s^"[_SHIFT_ORDER.index(key)],
            capsize=3,
            label=key,
        )
    axis.set_yticks(range(len(names)), [LABELS[name].replace("`", "") for name in names])
    axis.invert_yaxis()
    axis.set_xlabel("test accuracy (clean: mean and 95% interval)")
    axis.set_title(f"UCI digits, {results['settings']['shots']} labels per class, {n} draws")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_lr_sweep(results: dict[str, Any]) -> Any:
    """Mean accuracy against the peak LR, one line per recipe of the sweep (bars: std over the
    draws)."""
    import matplotlib.pyplot as plt

    sweep, pool = sweep_of(results)
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for name, points in sweep["recipes"].items():
        lrs = [float(lr) for lr in points]
        axis.errorbar(
            lrs,
            [points[lr]["accuracy"] for lr in points],
            yerr=[points[lr]["accuracy_std"] for lr in points],
            marker="o",
            capsize=3,
            label=LABELS[name].replace("`", ""),
        )
    axis.set_xscale("log")
    axis.set_xlabel("peak LR (the discriminative recipe: the head's; the stem's is 10x lower)")
    axis.set_ylabel("test accuracy")
    n = len(next(iter(next(iter(sweep["recipes"].values())).values()))["accuracies"])
    axis.set_title(f"Accuracy against the LR ({n} draws of the {pool} pool)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
