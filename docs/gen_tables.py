"""Write the main job's tables into the README and docs/demo.md from the committed results.

The numbers of ``python -m difflr.demo`` live in one place, ``docs/results/demo.json`` (and
``docs/results/demo_letters.json`` for ``--source letters``); the tables are generated from them
between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` markers. Run from the repository
root after committing new results::

    python -m difflr.demo --select --lr-sweep --out /tmp/demo
    cp /tmp/demo/results.json docs/results/demo.json
    python docs/gen_tables.py           # rewrite the tables; --check only compares

``docs/gen_figures.py`` draws the figures from the same files; ``tests/test_docs.py`` checks that
the tables in the README and the docs are what this script writes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "demo.json"
LETTERS = ROOT / "docs" / "results" / "demo_letters.json"
#: The default command (`python -m difflr.demo`, nothing cached) timed on a quiet machine.
TIMING = ROOT / "docs" / "results" / "demo_timing.json"
#: The files whose tables are generated, and the tables each holds.
TARGETS = {
    ROOT / "README.md": ("main", "timing"),
    ROOT / "docs" / "demo.md": ("machine", "timing", "main", "letters", "lr_sweep", "selection"),
}


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def tables(
    results: dict[str, Any], letters: dict[str, Any] | None, timing: dict[str, Any] | None = None
) -> dict[str, str]:
    """Every generated block, by name."""
    from difflr.demos import report

    if timing is not None and "runs" in results:
        timed = report.timing_note(timing, results)
    else:
        timed = "(not timed yet on a quiet machine)"

    if "runs" in results:
        blocks = {"main": report.main_table(results), "machine": report.machine_note(results)}
    else:  # a selection whose evaluation has not been committed yet
        missing = (
            "(The evaluation on the 10 draws of the evaluation pool is not in the committed "
            "results yet: `python -m difflr.demo` measures it.)"
        )
        blocks = {"main": missing, "machine": report.machine_note(results)}
    if "lr_sweep" in results or "selection" in results:
        blocks["lr_sweep"] = report.lr_sweep_table(results)
    if "selection" in results:
        blocks["selection"] = report.selection_table(results)
    blocks["letters"] = (
        report.letters_table(letters)
        if letters is not None
        else "(not measured yet: `python -m difflr.demo --source letters` writes it)"
    )
    blocks["timing"] = timed
    return blocks


def fill(text: str, blocks: dict[str, str], names: tuple[str, ...]) -> str:
    """``text`` with the block between each ``<!-- table:NAME -->`` pair replaced."""
    for name in names:
        pattern = re.compile(
            rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)", flags=re.DOTALL
        )
        if not pattern.search(text):
            raise ValueError(f"no <!-- table:{name} --> ... <!-- /table:{name} --> markers")
        block = blocks[name]
        text = pattern.sub(lambda m, block=block: m.group(1) + block + "\n" + m.group(2), text)
    return text


def generated() -> dict[Path, str]:
    """What each target file holds once its tables are regenerated."""
    results = load(RESULTS)
    if results is None:
        raise FileNotFoundError(f"{RESULTS} is missing: run the demo and copy its results.json")
    blocks = tables(results, load(LETTERS), load(TIMING))
    return {path: fill(path.read_text(), blocks, names) for path, names in TARGETS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a change")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated().items():
        if path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
    if args.check and stale:
        print("stale tables: " + ", ".join(str(p.relative_to(ROOT)) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
