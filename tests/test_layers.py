"""The package's layering (pyproject's import-linter contracts) holds, and would catch a breach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("importlinter", reason="pip install -e '.[dev]' brings import-linter")


def _lint_imports(cwd: Path, package_parent: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(package_parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_hold() -> None:
    result = _lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path: Path) -> None:
    # The circle this contract was written against: groups.py (a low floor) asking vision.py (a
    # high one) for a default splitter.
    shutil.copytree(ROOT / "difflr", tmp_path / "difflr")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    groups = tmp_path / "difflr" / "groups.py"
    groups.write_text(groups.read_text() + "\n\ndef _lookup():\n    from difflr import vision\n")
    result = _lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "difflr.groups -> difflr.vision" in result.stdout
    assert "1 kept, 2 broken" in result.stdout


def test_importing_transformers_breaks_the_contracts(tmp_path: Path) -> None:
    # Hugging Face support must not make `import difflr` need transformers, even lazily.
    shutil.copytree(ROOT / "difflr", tmp_path / "difflr")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    hf = tmp_path / "difflr" / "hf.py"
    hf.write_text(hf.read_text() + "\n\ndef _model_class():\n    import transformers\n")
    result = _lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "difflr.hf -> transformers" in result.stdout
    assert "2 kept, 1 broken" in result.stdout
