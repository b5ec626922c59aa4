"""The docs site: `mkdocs build --strict` passes, every tutorial is a page, the figures come from
difflr's own schedule code, and the docs' quick start is the README's."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from difflr import expand_lrs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
MKDOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def quick_start_block(path: Path) -> str:
    """The first ```bash block of the ``## Quick start`` section of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    match = re.search(r"^## Quick start\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"{path} has no '## Quick start' section"
    block = re.search(r"^```bash\n(.*?)^```", match.group(1), flags=re.MULTILINE | re.DOTALL)
    assert block, f"the quick start of {path} has no ```bash block"
    return block.group(1)


def test_docs_quick_start_is_the_readmes():
    readme = quick_start_block(ROOT / "README.md")
    docs = quick_start_block(ROOT / "docs" / "index.md")
    assert docs == readme
    commands = [line for line in readme.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands


def test_every_notebook_is_a_tutorial_page_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    index = (ROOT / "docs" / "tutorials" / "index.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"tutorials/{path.stem}.md" in config, f"{path.name} is not in mkdocs.yml's nav"
        assert f"({path.stem}.md)" in index, f"{path.name} is not listed in tutorials/index.md"


def _load_gen_figures():
    spec = importlib.util.spec_from_file_location("gen_figures", ROOT / "docs" / "gen_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_schedule_figure_draws_every_group_of_the_one_cycle():
    figure = _load_gen_figures().one_cycle_figure(n_steps=100)
    lr_lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lr_lines] == ["0.stem", "1.body", "2.head"]
    peaks = [line.get_ydata().max() for line in lr_lines]
    np.testing.assert_allclose(peaks, expand_lrs(slice(1e-5, 1e-3), 3))
    moms = figure.axes[1].get_lines()[0].get_ydata()
    assert moms[0] == pytest.approx(0.95) and moms.min() == pytest.approx(0.85)


def test_the_fine_tune_figure_marks_the_second_fit():
    figure = _load_gen_figures().fine_tune_figure()
    head = figure.axes[0].get_lines()[2].get_ydata()
    assert len(head) == 25 * 5  # 1 frozen + 4 unfrozen epochs of 25 steps
    boundaries = [line for line in figure.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in boundaries] == [25]
    assert (ROOT / "docs" / "img" / "fine_tune.png").is_file()
    assert (ROOT / "docs" / "img" / "one_cycle.png").is_file()


def test_mkdocs_build_strict(tmp_path):
    missing = [name for name in MKDOCS_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"the docs need {missing}: pip install -e '.[dev]' (mkdocs-material, mkdocstrings)"
        )
    site = tmp_path / "site"
    command = ["mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)]
    result = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for path in NOTEBOOKS:
        page = site / "tutorials" / path.stem / "index.html"
        assert page.is_file(), f"no page for {path.name}"
        assert (site / "tutorials" / path.name).is_file(), f"{path.name} is not offered"
    # mkdocstrings rendered the API from the docstrings (a signature and a doctest).
    page = (site / "api" / "lr" / "index.html").read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert "n_groups: int" in text and ">>> expand_lrs(slice(1e-5, 1e-3), 3)" in text
