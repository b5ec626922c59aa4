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
    assert "5 kept, 0 broken" in result.stdout


def _lint_with(tmp_path: Path, module: str, function: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on a copy of the package with ``function`` appended to ``module``."""
    shutil.copytree(ROOT / "difflr", tmp_path / "difflr")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    file = tmp_path / "difflr" / module
    file.write_text(file.read_text() + "\n\n" + function)
    return _lint_imports(tmp_path, tmp_path)


def test_an_upward_import_breaks_the_contracts(tmp_path: Path) -> None:
    # The circle this contract was written against: groups/layers.py (a low floor) asking
    # vision.py (a high one) for a default splitter. vision imports Lightning through the
    # Learner, so the torch-only core's contract breaks too.
    result = _lint_with(
        tmp_path, "groups/layers.py", "def _lookup():\n    from difflr import vision\n"
    )
    assert result.returncode != 0
    assert "difflr.groups.layers -> difflr.vision" in result.stdout
    assert "2 kept, 3 broken" in result.stdout


def test_importing_transformers_breaks_the_contracts(tmp_path: Path) -> None:
    # Hugging Face support must not make `import difflr` need transformers, even lazily.
    result = _lint_with(tmp_path, "groups/hf.py", "def _model_class():\n    import transformers\n")
    assert result.returncode != 0
    assert "difflr.groups.hf -> transformers" in result.stdout
    assert "4 kept, 1 broken" in result.stdout


def test_lightning_in_the_torch_only_core_breaks_the_contracts(tmp_path: Path) -> None:
    # A schedule that asked the Trainer for its step count would tie the pure floor to Lightning.
    result = _lint_with(
        tmp_path, "policy/schedules.py", "def _steps():\n    import lightning.pytorch\n"
    )
    assert result.returncode != 0
    assert "difflr.policy.schedules -> lightning" in result.stdout
    assert "4 kept, 1 broken" in result.stdout


def test_importing_peft_breaks_the_contracts(tmp_path: Path) -> None:
    # Adapter support must not make `import difflr` need peft, even lazily.
    result = _lint_with(tmp_path, "groups/adapters.py", "def _tuner():\n    import peft\n")
    assert result.returncode != 0
    assert "difflr.groups.adapters -> peft" in result.stdout
    assert "4 kept, 1 broken" in result.stdout
