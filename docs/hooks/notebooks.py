"""mkdocs hook: render the tutorial notebooks in ``nbs/`` as pages under ``tutorials/``.

The notebooks are committed without outputs, so a page shows the notebook's text and code; the
``.ipynb`` is published next to it for download. Links between notebooks
(``02_discriminative_lrs_and_freezing.ipynb``) become links between the pages.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

NOTEBOOKS = Path(__file__).resolve().parents[2] / "nbs"
FOLDER = "tutorials"
_NOTEBOOK_LINK = re.compile(r"\]\((\d\d_[A-Za-z0-9_]+)\.ipynb\)")


def notebook_to_markdown(path: Path) -> str:
    """The notebook's markdown cells as they are and its code cells as Python blocks."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    parts = []
    for index, cell in enumerate(notebook["cells"]):
        source = "".join(cell["source"]).strip("\n")
        if not source:
            continue
        if cell["cell_type"] == "markdown":
            parts.append(_NOTEBOOK_LINK.sub(r"](\1.md)", source))
        elif cell["cell_type"] == "code":
            parts.append(f"```python\n{source}\n```")
        if index == 0:  # under the title
            parts.append(
                f'!!! note "Run it"\n'
                f"    This page is the notebook [`nbs/{path.name}`]({path.name}) without its "
                "outputs. Download it and run it in Jupyter: it takes well under a minute on a "
                "CPU and downloads nothing."
            )
    return "\n\n".join(parts) + "\n"


def on_files(files: Files, config) -> Files:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        page = f"{FOLDER}/{path.stem}.md"
        files.append(File.generated(config, page, content=notebook_to_markdown(path)))
        files.append(File.generated(config, f"{FOLDER}/{path.name}", abs_src_path=str(path)))
    return files
