"""The package's conventions hold in every module: an accurate ``__all__``, no reaching into
another module's privates, warnings that point at the user's line, declared dependencies, modules
of a readable length."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Any

import pytest

import difflr

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "difflr"

#: Files whose owners are changing them in parallel work; each entry says what is left to do
#: there, and goes once that work has landed.
PENDING_ALL: dict[str, Any] = {}
PENDING_STACKLEVEL: set[str] = set()
#: Modules over the limit whose split by concept is still to do (none now).
PENDING_LENGTH: set[str] = set()
#: Test files whose owners are changing them in parallel work (issues 24, 25, 26).
PENDING_QUIET = {"test_checkpoints.py", "test_resume.py"}

#: Private names of other packages that difflr cannot do without, each confined to one place
#: (STYLE.md): where it is used, what it is.
FOREIGN_PRIVATES = {
    ("difflr.optim.implementation", "torch.optim.optimizer._default_to_fused_or_foreach"),
    (
        "difflr.training.handback",
        "lightning.pytorch.strategies.launchers.multiprocessing._MultiProcessingLauncher",
    ),
}

#: Import names of the distributions pyproject.toml declares (dependencies or extras).
DISTRIBUTIONS = {
    "torch": "torch",
    "torchvision": "torchvision",
    "lightning": "lightning",
    "numpy": "numpy",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
    "tqdm": "tqdm",
    "typing_extensions": "typing_extensions",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "peft": "peft",
    "timm": "timm",
    "PIL": "pillow",
}
#: Imported only where they are sure to be there.
PRESENT_WHERE_USED = {"IPython"}  # inside a running Jupyter kernel

MAX_LINES = 600


def _modules() -> list[str]:
    return ["difflr", *(m.name for m in pkgutil.walk_packages(difflr.__path__, "difflr."))]


def _file(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _tree(module: str) -> ast.Module:
    return ast.parse(_file(module).read_text(), filename=str(_file(module)))


MODULES = _modules()


def test_every_module_is_found() -> None:
    assert len(MODULES) == len(list(PACKAGE.rglob("*.py")))


@pytest.mark.parametrize("module", MODULES)
def test_every_module_lists_its_public_names_in_all(module: str) -> None:
    pending = PENDING_ALL.get(module, set())
    if pending == "*":
        pytest.skip("its owner adds __all__ (see PENDING_ALL)")
    imported = importlib.import_module(module)
    names = getattr(imported, "__all__", None)
    assert isinstance(names, list), f"{module} has no __all__ list"
    assert len(set(names)) == len(names), f"{module}.__all__ repeats a name"
    missing = [n for n in names if not hasattr(imported, n)]
    assert not missing, f"{module}.__all__ names what it does not have: {missing}"
    public = [
        node.name
        for node in _tree(module).body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and not node.name.startswith("_")
    ]
    unlisted = sorted(set(public) - set(names) - set(pending))
    assert not unlisted, (
        f"{module} defines {unlisted} without listing them in __all__: list them, or make them "
        "private with a leading underscore"
    )


def _difflr_modules_bound(tree: ast.Module) -> set[str]:
    """Names a file binds to difflr modules (``import difflr.x as m``, ``from difflr import x``)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "difflr":
                    bound.add(alias.asname or "difflr")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "difflr":
            for alias in node.names:
                if _file(f"{node.module}.{alias.name}").exists():
                    bound.add(alias.asname or alias.name)
    return bound


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("module", MODULES)
def test_no_module_reaches_into_another_modules_privates(module: str) -> None:
    tree = _tree(module)
    reached = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if not _is_private(alias.name):
                    continue
                where = f"{node.module}.{alias.name}"
                if node.module.split(".")[0] == "difflr" or (module, where) not in FOREIGN_PRIVATES:
                    reached.append(where)
    bound = _difflr_modules_bound(tree)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and _is_private(node.attr)
        ):
            reached.append(f"{node.value.id}.{node.attr}")
    assert not reached, (
        f"{module} uses private names of other modules: {reached}; make what it needs public "
        "where it is defined, or move it down a floor"
    )


def _warn_calls(tree: ast.Module) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "warn"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "warnings"
    ]


@pytest.mark.parametrize("module", MODULES)
def test_every_warning_points_at_the_users_line(module: str) -> None:
    if module in PENDING_STACKLEVEL:
        pytest.skip("its owner moves it to user_stacklevel (see PENDING_STACKLEVEL)")
    tree = _tree(module)
    assert not any(
        isinstance(node, ast.ImportFrom) and node.module == "warnings" for node in ast.walk(tree)
    ), f"{module}: call warnings.warn, so that this test sees the call"
    for call in _warn_calls(tree):
        level = next((k.value for k in call.keywords if k.arg == "stacklevel"), None)
        assert (
            isinstance(level, ast.Call)
            and isinstance(level.func, ast.Name)
            and level.func.id == "user_stacklevel"
        ), f"{module}:{call.lineno}: pass stacklevel=user_stacklevel() (difflr.utils.checks)"


def test_every_module_is_short_enough_to_read() -> None:
    long = {
        module: n
        for module in MODULES
        if module not in PENDING_LENGTH
        and (n := len(_file(module).read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def _declared() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    names = set()
    for requirement in requirements:
        name = requirement
        for stop in "<>=![; ":
            name = name.split(stop)[0]
        names.add(name.strip().lower().replace("-", "_"))
    return names


def test_every_package_difflr_imports_is_declared() -> None:
    declared = _declared()
    stdlib = set(sys.stdlib_module_names)
    undeclared = set()
    for module in MODULES:
        for node in ast.walk(_tree(module)):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                if root in stdlib or root == "difflr" or root in PRESENT_WHERE_USED:
                    continue
                distribution = DISTRIBUTIONS.get(root, root).lower().replace("-", "_")
                if distribution not in declared:
                    undeclared.add(f"{root} ({module})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"


@pytest.mark.parametrize(
    "path", sorted(p for p in (ROOT / "tests").glob("*.py") if p.name != "helpers.py"), ids=str
)
def test_tests_build_quiet_learners_through_the_helpers(path: Path) -> None:
    """A test that wants a Learner without logs or progress asks `tests.helpers.make_learner`
    (or its `quiet` options), so that every test's Learner is quiet the same way."""
    if path.name in PENDING_QUIET:
        pytest.skip("its owner routes it through tests/helpers.py (see PENDING_QUIET)")
    ad_hoc = [
        f"{path.name}:{node.lineno}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and any(
            k.arg in ("logger", "enable_progress_bar")
            and isinstance(k.value, ast.Constant)
            and k.value.value is False
            for k in node.keywords
        )
        and getattr(node.func, "id", getattr(node.func, "attr", ""))
        in ("Learner", "vision_learner")
    ]
    assert not ad_hoc, f"quiet Learners built by hand: {ad_hoc}; use tests.helpers.make_learner"
