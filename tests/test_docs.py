"""The docs site: `mkdocs build --strict` passes, every tutorial is a page that shows the executed
notebook's outputs, the figures come from difflr's own schedule code, and the docs' quick start
is the README's."""

from __future__ import annotations

import base64
import html
import importlib.util
import json
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
HOOK = ROOT / "docs" / "hooks" / "notebooks.py"
# The test run's cache of executed notebooks, under pytest's temporary folder for the run; the
# same name in tests/test_notebooks.py.
NOTEBOOK_CACHE = "executed-notebooks"
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


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hook():
    """The docs' notebook hook (docs/hooks/notebooks.py)."""
    pytest.importorskip("mkdocs", reason="the docs are built with mkdocs ([dev] extra)")
    return _load(HOOK, "notebooks_hook")


def _load_gen_figures():
    return _load(ROOT / "docs" / "gen_figures.py", "gen_figures")


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


def test_the_demo_tables_are_generated_from_the_committed_results():
    """The README's and the docs' tables of the main job are what docs/gen_tables.py writes from
    docs/results/demo.json: a number typed by hand, or results committed without regenerating
    the tables, fails here."""
    gen_tables = _load(ROOT / "docs" / "gen_tables.py", "gen_tables")
    results = json.loads(gen_tables.RESULTS.read_text())
    for path, text in gen_tables.generated().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name}'s tables are not docs/results/demo.json's; run python docs/gen_tables.py"
        )
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if "runs" in results:
        full = results["runs"]["full"]
        assert f"{full['accuracy']:.3f} ± {full['accuracy_std']:.3f}" in readme


def _three_decimals(value: object, found: set[str]) -> None:
    """Every number in ``value`` (nested dicts and lists), as the prose writes it: |x| to 3
    decimals."""
    if isinstance(value, dict):
        for item in value.values():
            _three_decimals(item, found)
    elif isinstance(value, list):
        for item in value:
            _three_decimals(item, found)
    elif isinstance(value, float):
        found.add(f"{abs(value):.3f}")


def _prose(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


def test_the_demo_prose_quotes_only_numbers_of_the_committed_results():
    """The claim and "what pays" on the docs page and the README's summary are prose, not
    generated tables: every 3-decimal number in them must be one of the committed results' (an
    accuracy, a spread, an interval's mean or bound, a sweep point, the selection's, the
    letters-only run's), so a number typed from an older run fails here."""
    found: set[str] = set()
    for name in ("demo.json", "demo_letters.json"):
        _three_decimals(json.loads((ROOT / "docs" / "results" / name).read_text()), found)
    page = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    prose = [
        _prose(page, "## Claim", "## Method"),
        _prose(page, "## What pays and what does not", "## How the hyper-parameters"),
        _prose(readme, "What it says:", "The table is generated from"),
    ]
    quoted = {m for text in prose for m in re.findall(r"(?<![\d.])\d\.\d{3}(?!\d)", text)}
    assert len(quoted) > 20  # the prose does quote the results
    assert quoted <= found, sorted(quoted - found)


def test_the_demo_figures_are_drawn_from_the_committed_results():
    gen_figures = _load_gen_figures()
    results = json.loads((ROOT / "docs" / "results" / "demo.json").read_text())
    sweep = gen_figures.demo_figures()["demo_lr_sweep"]
    from difflr.demos.report import sweep_of

    full = sweep_of(results)[0]["recipes"]["full"]
    line = sweep.axes[0].containers[0].lines[0]
    np.testing.assert_allclose(
        np.asarray(line.get_ydata(), float), [p["accuracy"] for p in full.values()]
    )
    for name in gen_figures.demo_figures():
        assert (ROOT / "docs" / "img" / f"{name}.png").is_file(), name


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built by `mkdocs build --strict`, once for this module.

    The build executes the tutorial notebooks into the test run's notebook cache, which
    tests/test_notebooks.py then reads instead of running them again.
    """
    missing = [name for name in MKDOCS_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"the docs need {missing}: pip install -e '.[dev]' (mkdocs-material, mkdocstrings)"
        )
    folder = tmp_path_factory.mktemp("docs")
    site = folder / "site"
    command = ["mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)]
    result = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=900,  # it runs the notebooks, two at a time
        env={
            **os.environ,
            "NO_MKDOCS_2_WARNING": "1",
            "DIFFLR_NOTEBOOK_CACHE": str(tmp_path_factory.getbasetemp() / NOTEBOOK_CACHE),
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def test_mkdocs_build_strict(site):
    for path in NOTEBOOKS:
        page = site / "tutorials" / path.stem / "index.html"
        assert page.is_file(), f"no page for {path.name}"
        assert (site / "tutorials" / path.name).is_file(), f"{path.name} is not offered"
    # mkdocstrings rendered the API from the docstrings (a signature and a doctest).
    page = (site / "api" / "lr" / "index.html").read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert "n_groups: int" in text and ">>> expand_lrs(slice(1e-5, 1e-3), 3)" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_tutorial_page_shows_what_the_notebook_showed(site, tmp_path_factory, path):
    """Every figure (as a PNG next to the page, the bytes the kernel sent), every HTML output
    (epoch tables, live progress in its finished state) and the printed text, in the page;
    the build machine's noise and folders not."""
    hook = _hook()
    notebook = hook.execute([path], tmp_path_factory.getbasetemp() / NOTEBOOK_CACHE)[path.name]
    page_path = site / "tutorials" / path.stem / "index.html"
    page = page_path.read_text(encoding="utf-8")
    article = page[page.index("<article") : page.index("</article>")]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    figures = [o.data["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    sources = re.findall(r'<img class="nb-figure" src="([^"]+)"', article)
    assert len(sources) == len(figures) >= 1, path.name
    for source, figure in zip(sources, figures):
        assert (page_path.parent / source).read_bytes() == base64.b64decode(figure), source
    shown = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    for output in shown:
        assert output in article, f"{path.name}: an HTML output is missing"
    printed = "".join(o.text for o in outputs if o.get("name") == "stdout")
    text = html.unescape(re.sub(r"<[^>]+>", "", article))
    for line in printed.splitlines():
        assert line in text, f"{path.name}: printed line {line!r} is missing"
    assert "run top to bottom" in text and "without its outputs" not in text
    for pattern in hook.NOISE:
        assert not pattern.search(text), f"{path.name}: {pattern.pattern} on the page"
    assert str(ROOT) not in page and "site-packages" not in page and "Traceback" not in text
    # Nothing of the machine that built it: a kernel's temporary files, a parallel build's wait.
    assert "ipykernel_" not in page and "waiting for another process" not in text


def test_the_tutorials_show_epoch_tables_and_finished_progress_bars(site):
    pages = "".join(
        (site / "tutorials" / p.stem / "index.html").read_text(encoding="utf-8") for p in NOTEBOOKS
    )
    displays = re.findall(r'<div class="difflr-progress"(.*?)</div></div>', pages, flags=re.S)
    assert any("<table" in display for display in displays), "no epoch table on the pages"
    states = re.findall(r'data-state="(\w+)"', pages)
    assert states and set(states) == {"finished"}, states
    assert pages.count("<progress") == len(states)  # every bar is a finished live display


def _cell(*outputs, tags=()) -> dict:
    return {"cell_type": "code", "metadata": {"tags": list(tags)}, "outputs": list(outputs)}


def _stream(name: str, text: str) -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def test_cell_outputs_are_shown_in_order_escaped_and_without_noise():
    hook = _hook()
    png = base64.b64encode(b"\x89PNG fake").decode()
    stored = {}

    def image(name: str, data: bytes) -> str:
        stored[name] = data
        return f"files/{name}"

    cell = _cell(
        _stream("stdout", "a <b> & c\n"),
        _stream("stderr", "/x/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: "),
        _stream("stderr", "IProgress not found. Please update jupyter\n  from .auto import tqdm\n"),
        _stream("stderr", "/x/site-packages/m.py:3: UserWarning: mind this\n  f()\n"),
        _stream("stdout", "step 1\rstep 2\n\x1b[31mred\x1b[0m\n"),
        {
            "output_type": "display_data",
            "data": {"text/html": "<table>T</table>", "text/plain": "T"},
        },
        {"output_type": "execute_result", "data": {"image/png": png, "text/plain": "<Figure>"}},
        {"output_type": "execute_result", "data": {"text/plain": "SuggestedLRs(valley=0.01)"}},
    )
    shown = hook.cell_outputs_html(cell, "nb cell 1", image)
    assert shown == (
        '<div class="nb-output">'
        '<pre class="nb-stdout">a &lt;b&gt; &amp; c\n</pre>'
        '<pre class="nb-stderr">/x/site-packages/m.py:3: UserWarning: mind this\n  f()\n</pre>'
        '<pre class="nb-stdout">step 2\nred\n</pre>'
        '<div class="nb-html"><table>T</table></div>'
        '<img class="nb-figure" src="files/0.png" alt="figure">'
        '<pre class="nb-result">SuggestedLRs(valley=0.01)</pre>'
        "</div>"
    )
    assert stored == {"0.png": b"\x89PNG fake"}
    assert hook.cell_outputs_html(_cell(), "nb cell 2") == ""
    paths = "/x/lib/site-packages/m.py:3: W\n/checkout/difflr/lr.py:9: W\n"
    assert hook._without_paths(paths, ["/checkout"]) == "m.py:3: W\ndifflr/lr.py:9: W\n"
    cell_warning = "/tmp/ipykernel_4242/1753094.py:3: UserWarning: metrics accuracy ...\n"
    assert hook._without_paths(cell_warning, []) == "<cell>:3: UserWarning: metrics accuracy ...\n"


def test_a_cell_that_raised_fails_its_page_unless_the_error_is_the_point():
    hook = _hook()
    error = {
        "output_type": "error",
        "ename": "ZeroDivisionError",
        "evalue": "division by zero",
        "traceback": ["\x1b[31mTraceback (most recent call last)\x1b[0m", "..."],
    }
    with pytest.raises(hook.PluginError, match="nb cell 3 raised ZeroDivisionError"):
        hook.cell_outputs_html(_cell(error), "nb cell 3")
    shown = hook.cell_outputs_html(_cell(error, tags=["raises-exception"]), "nb cell 3")
    assert (
        shown
        == '<div class="nb-output"><pre class="nb-error">ZeroDivisionError: division by zero</pre></div>'
    )


def test_the_cache_key_follows_the_notebook_and_difflr(tmp_path):
    hook = _hook()
    (tmp_path / "difflr" / "__pycache__").mkdir(parents=True)
    (tmp_path / "nbs").mkdir()
    notebook = tmp_path / "nbs" / "01_a.ipynb"
    notebook.write_text("{}")
    source = tmp_path / "difflr" / "lr.py"
    source.write_text("A = 1\n")
    key = hook.cache_key(notebook, root=tmp_path)
    (tmp_path / "difflr" / "__pycache__" / "lr.pyc").write_bytes(b"\0")
    (tmp_path / "nbs" / "02_b.ipynb").write_text("{}")  # another notebook
    assert hook.cache_key(notebook, root=tmp_path) == key
    source.write_text("A = 2\n")
    assert hook.cache_key(notebook, root=tmp_path) != key
    source.write_text("A = 1\n")
    assert hook.cache_key(notebook, root=tmp_path) == key
    notebook.write_text('{"cells": []}')
    assert hook.cache_key(notebook, root=tmp_path) != key
    assert hook.cache_key(notebook, root=tmp_path, environment="other packages") != key


def test_a_notebook_that_raises_fails_the_build_and_is_not_cached(tmp_path, monkeypatch):
    pytest.importorskip("nbclient", reason="nbclient runs the notebooks ([dev] extra)")
    pytest.importorskip("ipykernel", reason="the notebooks run in an ipykernel ([dev] extra)")
    from mkdocs.config import load_config
    from mkdocs.structure.files import Files

    hook = _hook()
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    cell = {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None}
    notebook = {
        "cells": [
            {**cell, "id": "fine", "source": "print('fine')"},
            {**cell, "id": "broken", "source": "1 / 0"},
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (nbs / "01_broken.ipynb").write_text(json.dumps(notebook))
    monkeypatch.setattr(hook, "NOTEBOOKS", nbs)
    monkeypatch.setenv("DIFFLR_NOTEBOOK_CACHE", str(tmp_path / "cache"))
    config = load_config(str(ROOT / "mkdocs.yml"))
    with pytest.raises(hook.PluginError, match=r"(?s)01_broken.ipynb: .*ZeroDivisionError"):
        hook.on_files(Files([]), config)
    assert not list((tmp_path / "cache").iterdir())
