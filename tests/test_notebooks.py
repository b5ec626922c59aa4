"""The tutorial notebooks in nbs/: committed without outputs, public API only, and each runs top to
bottom in a fresh Jupyter kernel with its figures rendered inline once."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
from pathlib import Path

import pytest

import difflr

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
CELL_TIMEOUT_S = 180  # one cell; each takes a few seconds on 2 CPU cores
PARALLEL_KERNELS = 2
# Attributes with a leading underscore that are public API (namedtuple's, on SuggestedLRs).
PUBLIC_UNDERSCORE = {"_fields", "_asdict", "_replace"}


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
                assert node.module == "difflr", f"{path.name}: import from {node.module}"
                private = [a.name for a in node.names if a.name not in difflr.__all__]
                assert not private, f"{path.name}: {private} not in difflr.__all__"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("difflr.") for a in node.names), path.name
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                assert node.attr.startswith("__") or node.attr in PUBLIC_UNDERSCORE, (
                    f"{path.name}: private attribute .{node.attr}"
                )


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory) -> dict[str, object]:
    """The selected notebooks, each run in its own fresh kernel and folder:
    ``{name: notebook or exception}``.

    The kernels run two at a time: most of a notebook's time is its kernel starting and
    importing torch and Lightning, which overlaps well with another notebook's training.
    """
    nbclient = pytest.importorskip("nbclient", reason="nbclient runs the notebooks ([dev] extra)")
    nbformat = pytest.importorskip("nbformat", reason="nbformat reads the notebooks ([dev] extra)")
    pytest.importorskip("ipykernel", reason="the notebooks run in an ipykernel ([dev] extra)")
    slots = asyncio.Semaphore(PARALLEL_KERNELS)

    async def run(path: Path) -> object:
        notebook = nbformat.read(path, as_version=4)
        cwd = tmp_path_factory.mktemp(path.stem)  # logs and checkpoints land here
        client = nbclient.NotebookClient(
            notebook,
            kernel_name="python3",
            timeout=CELL_TIMEOUT_S,
            resources={"metadata": {"path": str(cwd)}},
        )
        async with slots:
            try:
                await client.async_execute()  # CellExecutionError names the cell on an error
            except Exception as error:
                return error
        return notebook

    selected = [
        item.callspec.params["path"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_notebook_runs_top_to_bottom"
    ]

    async def run_all() -> list[object]:
        return await asyncio.gather(*(run(path) for path in selected))

    with pytest.MonkeyPatch.context() as patch:
        # The kernels import this checkout's difflr even when it is not installed.
        patch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        # The models are tiny: one thread each is faster, and kernels do not fight for cores.
        patch.setenv("OMP_NUM_THREADS", "1")
        results = asyncio.run(run_all())
    return {path.name: result for path, result in zip(selected, results)}


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
    assert n_images >= 1, f"{path.name} shows no figure"
