"""mkdocs hook: the tutorial notebooks in ``nbs/``, executed, as pages under ``tutorials/``.

Each page is its notebook run top to bottom in a fresh Jupyter kernel when the site is built:
the text, the code, and under each code cell what it showed — the epoch tables and the live
progress display (its last state: a finished bar), the figures (PNG files next to the page),
printed text, and the warnings a notebook user sees, less the build machine's noise (`NOISE`).
A notebook that raises fails the build; no traceback is published. The committed ``.ipynb``
(without outputs) is offered next to its page for download, and links between notebooks
(``02_discriminative_lrs_and_freezing.ipynb``) become links between the pages.

Running the notebooks takes minutes, so each executed notebook is cached (`execute`), keyed by a
hash of what its run depends on (`cache_key`): the notebook, the difflr sources, the Python and
the installed packages. The cache folder is ``$DIFFLR_NOTEBOOK_CACHE``, else ``.cache/notebooks``
in the checkout (so ``mkdocs serve`` re-executes a notebook only when something it depends on
changed). The test run gives the docs build (tests/test_docs.py) and the notebook tests
(tests/test_notebooks.py) one fresh cache folder, so each notebook runs once per test run,
in whichever comes first.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import importlib.metadata
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.utils import get_relative_url

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "nbs"
FOLDER = "tutorials"
CACHE_ENV = "DIFFLR_NOTEBOOK_CACHE"
DEFAULT_CACHE = ROOT / ".cache" / "notebooks"
CACHE_FORMAT = 1  # bump when how notebooks are executed changes (kernel, environment, timeout)
CELL_TIMEOUT_S = 180  # one cell; each takes a few seconds on 2 CPU cores
# Most of a notebook's time is its kernel starting and importing torch and Lightning, which
# overlaps well with another notebook's training.
PARALLEL_KERNELS = 2
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg"}

# stderr records (a line and the indented lines under it) that come from the machine that builds
# the site, not from what the tutorial does; a notebook user on a usual Jupyter does not see them.
NOISE = (
    # tqdm.auto imported without ipywidgets by transformers (difflr's own import hides it; a
    # notebook that imports transformers first, as 08 does, shows it).
    re.compile(r"TqdmWarning: IProgress not found"),
    # A Lightning release on a newer torch; also filtered in the test run (pyproject.toml).
    re.compile(r"isinstance\(treespec, LeafSpec\)` is deprecated"),
    # Lightning's advertisement for its cloud logger when a Trainer is made.
    re.compile(r"Tip: For seamless cloud logging"),
)

log = logging.getLogger(f"mkdocs.hooks.{__name__}")
_IPYKERNEL_CELL = re.compile(r"\S*ipykernel_\d+[/\\]\d+\.py")
_NOTEBOOK_LINK = re.compile(r"\]\((\d\d_[A-Za-z0-9_]+)\.ipynb\)")
_MARKER = "<!-- difflr-notebook-output {} -->"
_MARKER_PATTERN = re.compile(r"<!-- difflr-notebook-output (\d+) -->")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SITE_PACKAGES = re.compile(r"(?<![\w.])/[^\s:'\"]*/site-packages/")


# ---------------------------------------------------------------------------------- execution
def cache_key(path: Path, root: Path = ROOT, environment: str | None = None) -> str:
    """A hash of what running the notebook at ``path`` depends on: its text, every file of the
    ``difflr`` package under ``root``, the other files next to the notebook, and ``environment``
    (by default `environment_digest`)."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(label.encode() + b"\0" + hashlib.sha256(data).digest())

    add("environment", (environment or environment_digest()).encode())
    add("notebook", path.read_bytes())
    sources = [p for p in (root / "difflr").rglob("*") if "__pycache__" not in p.parts]
    neighbours = [p for p in path.parent.iterdir() if p.suffix != ".ipynb"]
    for file in sorted(sources) + sorted(neighbours):
        if file.is_file():
            add(file.relative_to(root).as_posix(), file.read_bytes())
    return digest.hexdigest()


def environment_digest() -> str:
    """A hash of how notebooks are run (`CACHE_FORMAT`), the Python and every installed
    distribution's version: the kernel runs this Python (Jupyter's native kernel)."""
    # A set without difflr itself: its sources are hashed file by file, and its metadata may be
    # found twice (the installed one and a checkout's difflr.egg-info on sys.path in pytest).
    packages = sorted(
        {
            f"{d.metadata['Name']}=={d.version}"
            for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "").lower() != "difflr"
        }
    )
    text = "\n".join([f"format {CACHE_FORMAT}", sys.version, *packages])
    return hashlib.sha256(text.encode()).hexdigest()


def execute(paths: Iterable[Path], cache_dir: Path) -> dict[str, Any]:
    """Each notebook executed top to bottom in a fresh kernel, or read from ``cache_dir``:
    ``{file name: executed notebook, or the exception that stopped it}``.

    A notebook runs in its own temporary folder (its logs and checkpoints land there), with this
    checkout's difflr importable and one thread per kernel. Only notebooks that ran to the end
    are cached, as ``<stem>-<key>.ipynb`` (written to a temporary file and renamed); an entry for
    an older key of the same notebook is removed.
    """
    try:
        import nbclient  # noqa: F401
        import nbformat
    except ImportError as error:
        raise PluginError(
            f"the docs run the tutorial notebooks, which needs {error.name}: "
            "pip install -e '.[dev]' (nbclient, nbformat, ipykernel)"
        ) from error

    cache_dir.mkdir(parents=True, exist_ok=True)
    environment = environment_digest()
    results: dict[str, Any] = {}
    to_run: list[tuple[Path, Path]] = []
    for path in paths:
        cached = cache_dir / f"{path.stem}-{cache_key(path, environment=environment)[:20]}.ipynb"
        try:
            results[path.name] = nbformat.read(cached, as_version=4)
        except (OSError, ValueError):  # not there, or unreadable: run it
            to_run.append((path, cached))
    if not to_run:
        return results
    log.info(f"Executing {len(to_run)} notebook(s), {PARALLEL_KERNELS} at a time")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        # The models are tiny: one thread each is faster, and kernels do not fight for cores.
        "OMP_NUM_THREADS": "1",
    }
    if any("TUTORIAL_PRETRAIN" in path.read_text(encoding="utf-8") for path, _ in to_run):
        _build_the_tutorials_backbone(env)
    ran = asyncio.run(_run_all([path for path, _ in to_run], env))
    for (path, cached), notebook in zip(to_run, ran):
        results[path.name] = notebook
        if not isinstance(notebook, Exception):
            _write_atomically(cached, nbformat.writes(notebook))
            for old in cache_dir.glob(f"{path.stem}-*.ipynb"):
                if old != cached:
                    old.unlink(missing_ok=True)
    return {path.name: results[path.name] for path in paths}


def _build_the_tutorials_backbone(env: dict[str, str]) -> None:
    """Build (or find) the pretrained backbone the tutorials share, before they run: a page then
    shows what a notebook user with the backbone cached sees, whether the site is built on a
    fresh machine or not, and never one notebook waiting for another that builds it."""
    log.info("Building the tutorials' backbone (once; then cached)")
    subprocess.run(
        [sys.executable, "-c", _BUILD_BACKBONE], env=env, check=True, timeout=CELL_TIMEOUT_S * 5
    )


_BUILD_BACKBONE = (
    "from difflr.demos import TUTORIAL_PRETRAIN, pretrained_backbone; "
    "pretrained_backbone(TUTORIAL_PRETRAIN, progress=False)"
)


async def _run_all(paths: list[Path], env: dict[str, str]) -> list[Any]:
    import nbclient
    import nbformat

    slots = asyncio.Semaphore(PARALLEL_KERNELS)

    async def run(path: Path) -> Any:
        notebook = nbformat.read(path, as_version=4)
        async with slots:
            with tempfile.TemporaryDirectory(
                prefix=f"{path.stem}-", ignore_cleanup_errors=True
            ) as cwd:
                client = nbclient.NotebookClient(
                    notebook,
                    kernel_name="python3",
                    timeout=CELL_TIMEOUT_S,
                    resources={"metadata": {"path": cwd}},
                    # The kernel's own log (a warning about its local TCP transport) is not the
                    # notebook's output; its errors still show.
                    extra_arguments=["--IPKernelApp.log_level=ERROR"],
                )
                start = time.perf_counter()
                try:
                    await client.async_execute(env=env)  # CellExecutionError names the cell
                except Exception as error:
                    return error
                notebook.metadata["difflr_docs"] = {
                    "seconds": round(time.perf_counter() - start, 1),
                    "cwd": cwd,
                }
        return notebook

    return await asyncio.gather(*(run(path) for path in paths))


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False
    ) as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(file.name, path)


# ---------------------------------------------------------------------------------- rendering
def notebook_to_markdown(
    notebook: Any, name: str, image: Callable[[str, bytes], str]
) -> tuple[str, list[str]]:
    """The page of an executed notebook: its Markdown, and the HTML of each code cell's outputs.

    Markdown cells stay as they are, code cells become Python blocks, and each cell's outputs are
    a marker (an HTML comment) that `on_page_content` replaces with their HTML, so that Markdown
    never touches them. ``image(file name, bytes)`` stores a figure and returns its ``src``.
    """
    seconds = notebook.metadata.get("difflr_docs", {}).get("seconds")
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    note = (
        f'!!! note "Run it"\n'
        f"    This page is the notebook [`nbs/{name}`]({name}), run top to bottom{took} when "
        "this site was built: under each cell is what it showed in Jupyter. Download it and "
        "run it yourself: it runs on a CPU and downloads nothing."
    )
    root_paths = [str(ROOT) + os.sep, notebook.metadata.get("difflr_docs", {}).get("cwd")]
    parts: list[str] = []
    outputs: list[str] = []
    for index, cell in enumerate(notebook.cells):
        source = cell.source.strip("\n")
        if cell.cell_type == "markdown" and source:
            parts.append(_NOTEBOOK_LINK.sub(r"](\1.md)", source))
        elif cell.cell_type == "code":
            if source:
                parts.append(f"```python\n{source}\n```")
            where = f"{name} cell {index}"
            shown = cell_outputs_html(cell, where, lambda n, d, i=index: image(f"{i}_{n}", d))
            shown = _without_paths(shown, [p for p in root_paths if p])
            if shown:
                parts.append(_MARKER.format(len(outputs)))
                outputs.append(shown)
        if index == 0:  # under the title
            parts.append(note)
    return "\n\n".join(parts) + "\n", outputs


def cell_outputs_html(
    cell: Any, where: str, image: Callable[[str, bytes], str] | None = None
) -> str:
    """The HTML of a code cell's outputs, in order, in one ``<div class="nb-output">``.

    Per output, the richest form a docs page can show: a figure (``<img>``), else the HTML
    (the epoch table and live progress), else the text. Streams are escaped, stderr without
    `NOISE`. An error fails (a notebook that raises is not published) unless the cell is tagged
    ``raises-exception``, where it is the point: then its name and message are shown.
    ``image(file name, bytes)`` stores the cell's figure ``<n>.png`` and returns its ``src``.
    """
    parts = []
    n_images = 0
    for output in _merged_streams(cell.get("outputs", [])):
        kind = output["output_type"]
        if kind == "stream":
            text = _plain(output["text"])
            if output["name"] == "stderr":
                text = _without_noise(text)
            if text.strip():
                parts.append(_pre(f"nb-{output['name']}", text))
        elif kind in ("display_data", "execute_result"):
            data = output.get("data", {})
            mime = next((m for m in IMAGE_TYPES if m in data), None)
            if mime is not None:
                if image is None:
                    raise PluginError(f"{where}: a figure, and nowhere to store it")
                figure = base64.b64decode(data[mime])
                src = image(f"{n_images}.{IMAGE_TYPES[mime]}", figure)
                n_images += 1
                parts.append(
                    f'<img class="nb-figure" src="{html.escape(src)}" alt="figure"{_size(figure)}>'
                )
            elif "text/html" in data:
                parts.append(f'<div class="nb-html">{data["text/html"]}</div>')
            elif "text/plain" in data:
                parts.append(_pre("nb-result", _plain(data["text/plain"])))
            else:
                raise PluginError(f"{where}: no way to show an output of type {sorted(data)}")
        elif kind == "error":
            if "raises-exception" not in cell.get("metadata", {}).get("tags", []):
                raise PluginError(
                    f"{where} raised {output['ename']}: {output['evalue']}; fix the notebook "
                    "(or tag the cell raises-exception if the error is the point)"
                )
            text = f"{output['ename']}: {_plain(output['evalue'])}"
            parts.append(_pre("nb-error", text))
    return f'<div class="nb-output">{"".join(parts)}</div>' if parts else ""


def _size(figure: bytes) -> str:
    """A PNG's ``width`` and ``height`` attributes (from its header), so that the page does not
    shift as figures load; nothing for another format."""
    if figure[:8] != b"\x89PNG\r\n\x1a\n" or len(figure) < 24:
        return ""
    width, height = struct.unpack(">II", figure[16:24])
    return f' width="{width}" height="{height}" loading="lazy"'


def _pre(css_class: str, text: str) -> str:
    return f'<pre class="{css_class}">{html.escape(text, quote=False)}</pre>'


def _merged_streams(outputs: list[Any]) -> list[dict[str, Any]]:
    """Consecutive outputs of one stream joined (a kernel sends a stream in pieces)."""
    merged: list[dict[str, Any]] = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (
            output["output_type"] == "stream"
            and previous is not None
            and previous["output_type"] == "stream"
            and previous["name"] == output["name"]
        ):
            previous["text"] += output["text"]
        else:
            merged.append(dict(output))
    return merged


def _plain(text: str) -> str:
    """Terminal text as a terminal leaves it: no colour codes, a line redrawn with ``\\r`` shown
    in its last state."""
    text = _ANSI.sub("", text).replace("\r\n", "\n")
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


def _without_noise(text: str) -> str:
    """stderr without the records (a line and the indented ones under it) that match `NOISE`."""
    records: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if records and line[:1] in (" ", "\t"):
            records[-1].append(line)
        else:
            records.append([line])
    kept = ["".join(r) for r in records if not any(p.search("".join(r)) for p in NOISE)]
    return "".join(kept)


def _without_paths(text: str, roots: list[str]) -> str:
    """The build machine's folders out of the page: paths relative to the checkout, to the
    notebook's working folder and to site-packages; a warning raised by a cell's own line names
    the cell (``<cell>:3``), not the kernel's temporary file for it."""
    text = _IPYKERNEL_CELL.sub("<cell>", text)
    text = _SITE_PACKAGES.sub("", text)
    for root in roots:
        text = text.replace(root.rstrip(os.sep) + os.sep, "")
    return text


# -------------------------------------------------------------------------------- mkdocs hooks
_outputs_by_page: dict[str, list[str]] = {}


def on_files(files: Files, config: Any) -> Files:
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    cache_dir = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    executed = execute(paths, cache_dir)
    failed = {name: nb for name, nb in executed.items() if isinstance(nb, Exception)}
    if failed:
        reasons = "\n\n".join(f"{name}: {_plain(str(error))}" for name, error in failed.items())
        raise PluginError(f"{len(failed)} tutorial notebook(s) failed to run:\n\n{reasons}")
    _outputs_by_page.clear()
    for path in paths:
        page = File.generated(config, f"{FOLDER}/{path.stem}.md", content="")
        images: list[File] = []

        def image(name: str, data: bytes, page: File = page, images: list[File] = images) -> str:
            uri = f"{page.src_uri[:-3]}_files/output_{name}"
            images.append(File.generated(config, uri, content=data))
            return get_relative_url(images[-1].url, page.url)

        markdown, outputs = notebook_to_markdown(executed[path.name], path.name, image)
        page.content_string = markdown
        files.append(page)
        for file in images:
            files.append(file)
        files.append(File.generated(config, f"{FOLDER}/{path.name}", abs_src_path=str(path)))
        _outputs_by_page[page.src_uri] = outputs
    return files


def on_page_content(content: str, page: Any, config: Any, files: Files) -> str:
    outputs = _outputs_by_page.get(page.file.src_uri)
    if outputs is None:
        return content
    found = [int(n) for n in _MARKER_PATTERN.findall(content)]
    if found != list(range(len(outputs))):
        raise PluginError(f"{page.file.src_uri}: cell outputs {found}, expected {len(outputs)}")
    return _MARKER_PATTERN.sub(lambda match: outputs[int(match.group(1))], content)
