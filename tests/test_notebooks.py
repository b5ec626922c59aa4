"""The tutorial notebooks in nbs/: committed without outputs, public API only, and each runs top to
bottom in a fresh Jupyter kernel with its figures rendered inline once and its live progress
displays finished."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

import difflr
import difflr.demos

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
HOOK = ROOT / "docs" / "hooks" / "notebooks.py"
# The test run's cache of executed notebooks, under pytest's temporary folder for the run; the
# same name in tests/test_docs.py.
NOTEBOOK_CACHE = "executed-notebooks"
# Attributes with a leading underscore that are public API (namedtuple's, on SuggestedLRs).
PUBLIC_UNDERSCORE = {"_fields", "_asdict", "_replace"}
# The modules a notebook may import from, with their public names: the package, and the
# pretrained backbone and data every fine-tuning tutorial starts from.
PUBLIC_MODULES = {module.__name__: set(module.__all__) for module in (difflr, difflr.demos)}


def _cells(path: Path, kind: str) -> list[dict]:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    return [cell for cell in notebook["cells"] if cell["cell_type"] == kind]


def _code(cell: dict) -> str:
    """A code cell's source without IPython magics (``%matplotlib inline``), as plain Python."""
    lines = "".join(cell["source"]).splitlines()
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)


def test_the_tutorials_are_numbered_and_all_there():
    names = [path.stem for path in NOTEBOOKS]
    assert [name[:3] for name in names] == [f"{i:02d}_" for i in range(1, len(names) + 1)]
    assert len(names) >= 6, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    stale = [
        i
        for i, cell in enumerate(_cells(path, "code"))
        if cell.get("outputs") or cell.get("execution_count") is not None
    ]
    assert not stale, (
        f"{path.name}: code cells {stale} carry outputs or execution counts; clear them before "
        "committing (Jupyter: Edit > Clear Outputs of All Cells)."
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_only_the_public_api(path):
    for cell in _cells(path, "code"):
        tree = ast.parse(_code(cell))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("difflr"):
                assert node.module in PUBLIC_MODULES, f"{path.name}: import from {node.module}"
                private = [a.name for a in node.names if a.name not in PUBLIC_MODULES[node.module]]
                assert not private, f"{path.name}: {private} not in {node.module}.__all__"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("difflr.") for a in node.names), path.name
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                assert node.attr.startswith("__") or node.attr in PUBLIC_UNDERSCORE, (
                    f"{path.name}: private attribute .{node.attr}"
                )


def load_hook():
    """The docs' notebook hook (docs/hooks/notebooks.py): it executes the notebooks, and caches
    them, for the docs build and for these tests alike."""
    spec = importlib.util.spec_from_file_location("notebooks_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory) -> dict[str, object]:
    """The selected notebooks, each run in its own fresh kernel and folder:
    ``{name: notebook or exception}``.

    The run's notebook cache is shared with the docs build (tests/test_docs.py, which sorts
    first): a notebook that the build has run is not run again, and one run here is not run
    again by the build. The cache is new for each test run, so each run executes every notebook.
    """
    pytest.importorskip("nbclient", reason="nbclient runs the notebooks ([dev] extra)")
    pytest.importorskip("nbformat", reason="nbformat reads the notebooks ([dev] extra)")
    pytest.importorskip("ipykernel", reason="the notebooks run in an ipykernel ([dev] extra)")
    pytest.importorskip("mkdocs", reason="the docs' hook runs the notebooks ([dev] extra)")
    selected = {
        item.callspec.params["path"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_notebook_runs_top_to_bottom"
    }
    if any(item.name == QUICK_START_TEST for item in request.session.items):
        selected.add(ROOT / "nbs" / "01_quick_start.ipynb")
    return load_hook().execute(sorted(selected), tmp_path_factory.getbasetemp() / NOTEBOOK_CACHE)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, executed):
    notebook = executed[path.name]
    if isinstance(notebook, Exception):
        raise notebook

    n_images = 0
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        images = []
        for output in cell.outputs:
            data = output.get("data", {})
            if re.match(r"<Figure size", data.get("text/plain", "")):
                assert "image/png" in data, (
                    f"{path.name} cell {index}: a Figure shown as text, not as an image"
                )
            if "image/png" in data:
                images.append(data["image/png"])
        assert len(images) == len(set(images)), f"{path.name} cell {index}: an image shown twice"
        n_images += len(images)
        # A live progress display (a <progress> bar) ends finished: the docs page shows its last
        # state, and a bar left running or interrupted would say training did not end.
        for output in cell.outputs:
            page = output.get("data", {}).get("text/html", "")
            if "<progress" in page:
                states = re.findall(r'data-state="(\w+)"', page)
                assert states == ["finished"], f"{path.name} cell {index}: progress ends {states}"
    assert n_images >= 1, f"{path.name} shows no figure"


QUICK_START_TEST = "test_the_quick_start_shows_the_pretrained_backbone_beating_scratch"


def test_the_quick_start_shows_the_pretrained_backbone_beating_scratch(executed):
    """The tutorials fine-tune a pretrained backbone because it works; the quick start's own
    comparison must show it (one draw of 50 images: a clear margin, not the demo's mean)."""
    notebook = executed["01_quick_start.ipynb"]
    if isinstance(notebook, Exception):
        raise notebook
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    found = re.search(r"fine-tuned (\d\.\d+), from scratch (\d\.\d+)", text)
    assert found, "the quick start no longer prints its comparison"
    tuned, scratch = map(float, found.groups())
    assert tuned > 0.9 and tuned > scratch + 0.05, (tuned, scratch)
