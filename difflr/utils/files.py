"""Every file difflr writes or reads: written atomically, read without running code.

Writes go to a temp file in the target's folder, are flushed to disk and renamed over the target:
a kill, a full disk or an error mid-write leaves the previous file as it was (and a rename never
follows a symlink planted at the target). Reads use ``torch.load(weights_only=True)``: a file
from someone else can hold tensors and plain values, never code to run; what needs more is
refused with an error that says why. `export_model` is the one exception, by design: it pickles a
whole module for inference, like fastai's ``export``, to be loaded only from a trusted source.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

__all__ = [
    "UnreadableFileError",
    "atomic_save",
    "atomic_write",
    "check_state_fits",
    "export_model",
    "load_state",
    "one_builder",
    "read_state",
    "safe_load",
    "state_file",
    "write_state",
]

#: Temp files of unfinished writes start with this; a claimed folder's leftovers can be removed.
TEMP_PREFIX = ".difflr-partial-"


class UnreadableFileError(ValueError):
    """A file difflr was asked to read is truncated, corrupt, or holds more than data."""


def atomic_write(file: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temp file next to ``file``, then rename it over ``file``.

    Args:
        file: The destination; its folder is created if needed.
        write: Writes the content to the open binary file it is given.

    Returns:
        ``file``.

    Raises:
        OSError: The write failed (a full disk, no permission); the message names the file and
            says that the previous one is unchanged. Any other error (or a ``KeyboardInterrupt``)
            propagates after the temp file is removed.
    """
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=file.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, file)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temp.unlink()
        cause = os_error_behind(error)
        if cause is not None:
            previous = "is unchanged" if file.exists() else "did not exist and still does not"
            raise OSError(
                cause.errno,
                f"could not write {file} ({cause.strerror or cause}); the previous {file.name} "
                f"{previous}. Free disk space or choose another path, then save again.",
            ) from error
        raise
    _sync_folder(file.parent)
    return file


def os_error_behind(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error``, if any: ``torch.save`` turns a failed write into a
    ``RuntimeError``, Lightning's TensorBoard logger into a ``ValueError``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_folder(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk (POSIX); best effort.
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def one_builder(file: Path, on_wait: Callable[[], Any] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``file`` + ``.lock`` for the body: processes (and threads) that
    would build the same file take turns, so the second finds the first one's result instead of
    redoing minutes of work beside it.

    The lock is ``flock`` on the lock file: the system releases it when its holder exits or is
    killed, so no stale lock is ever left (the empty lock file stays: deleting it would let a
    third builder lock a new file while the second holds the old one). Where ``fcntl`` does not exist (Windows) the body runs
    unlocked; the atomic write still keeps the file whole.

    Args:
        file: The file to build; the lock file sits next to it (its folder is created).
        on_wait: Called once, before blocking, when another builder holds the lock (to say so).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = Path(file).with_name(Path(file).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_save(obj: Any, file: Path) -> Path:
    """``torch.save(obj, file)``, atomically (see `atomic_write`)."""
    return atomic_write(file, lambda handle: torch.save(obj, handle))


def safe_load(file: Path, what: str = "file") -> Any:
    """``torch.load(file, weights_only=True)`` onto the CPU, with errors that say what to do.

    Args:
        file: The file to read.
        what: What the file should be, for messages (``"checkpoint"``, ``"saved Learner state"``).

    Raises:
        FileNotFoundError: No such file.
        UnreadableFileError: The file needs code to be run to load (a crafted or foreign pickle),
            or it is truncated or corrupt (a write killed by an older tool, a full disk).
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"no {what} at {file}.")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not zipfile.is_zipfile(file):  # not what torch.save writes: cut short, or not torch's
            raise UnreadableFileError(
                f"{file} is not a complete {what} (it is not a torch.save file: "
                f"{_telling_line(error)}); it was probably cut short by a killed process or a "
                "full disk, or it is another kind of file. Use an earlier file, or start anew."
            ) from None
        reason = _telling_line(error)
        raise UnreadableFileError(
            f"{file} is not a plain {what}: loading it would run code or build Python objects "
            f"({reason}). difflr reads only tensors and plain values from files, so a file from "
            "someone else cannot run anything. If you made this file yourself and trust it, load "
            "it with torch.load(..., weights_only=False)."
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError) as error:
        raise UnreadableFileError(
            f"{file} is not a complete {what} ({type(error).__name__}: {error}); it was probably "
            "cut short by a killed process or a full disk. Use an earlier file, or start anew."
        ) from error


def _telling_line(error: Exception) -> str:
    """The line of a ``weights_only`` refusal that says what the file holds (torch puts advice
    about ``weights_only`` first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [
        line for line in lines if re.search(r"unsupported|global|invalid|load key", line, re.I)
    ]
    line = (telling or lines or [type(error).__name__])[0]
    return line if len(line) <= 200 else line[:200] + "..."


def state_file(models: Path, name: str | Path) -> Path:
    """Where ``save(name)``/``load(name)`` go: ``models/{name}.pth`` for a name, or the path
    itself for a ``pathlib.Path``.

    Raises:
        TypeError: ``name`` is neither a string nor a ``Path``.
        ValueError: ``name`` is empty or would leave ``models`` (a separator, ``..``).

    Examples:
        >>> state_file(Path("models"), "stage1.5").as_posix()
        'models/stage1.5.pth'
    """
    if isinstance(name, Path):
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"name must be a str (a file name under path/models) or a pathlib.Path, got "
            f"{type(name).__name__}."
        )
    separators = [s for s in (os.sep, os.altsep, "/") if s]
    if not name or name in (".", "..") or any(s in name for s in separators):
        raise ValueError(
            f"name={name!r} is not a plain file name: save and load keep states in path/models. "
            "Pass a name such as 'stage1', or a pathlib.Path for a file elsewhere."
        )
    return models / (name if name.endswith(".pth") else f"{name}.pth")


def write_state(
    file: Path,
    model: nn.Module,
    frozen: list[bool],
    optimizer: torch.optim.Optimizer | None,
    groups: list[dict[str, Any]] | None = None,
) -> Path:
    """Save the model's weights, the frozen pattern and (unless ``None``) the optimizer state
    with the layer groups it belongs to (`difflr.groups.layers.group_fingerprint`), atomically."""
    state: dict[str, Any] = {"model": model.state_dict(), "frozen": list(frozen)}
    if optimizer is not None:
        state["opt"] = optimizer.state_dict()
        state["groups"] = groups
    return atomic_save(state, file)


def read_state(file: Path) -> dict[str, Any]:
    """What `write_state` wrote.

    Raises:
        FileNotFoundError: No such file.
        UnreadableFileError: The file is not a plain, complete saved state.
    """
    if not file.is_file():
        raise FileNotFoundError(f"no saved Learner state at {file}; see Learner.save(name).")
    state = safe_load(file, "saved Learner state")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UnreadableFileError(
            f"{file} is not a Learner state (a dict with the model's state_dict under 'model', "
            f"as Learner.save writes); it holds a {type(state).__name__}."
        )
    return state


def check_state_fits(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    file: Path,
    strict: bool = True,
    groups: list[dict[str, Any]] | None = None,
) -> None:
    """Refuse a saved state that does not fit ``model`` (and ``optimizer``) before anything is
    loaded, so that a refused load changes nothing.

    Raises:
        ValueError: Keys are missing or unexpected (``strict``), a tensor's shape differs, or the
            optimizer's param groups differ in number, size or name (a splitter that cuts the
            model differently, or the same groups in another order, would put each group's
            momentum on the wrong parameters).
    """
    own, saved = model.state_dict(), state["model"]
    if strict:
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        if missing or unexpected:
            raise ValueError(
                f"{file} does not fit this model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; pass strict=False to load the parameters both have."
            )
    for key, value in saved.items():
        if key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape:
            raise ValueError(
                f"{file} does not fit this model: {key} has shape {tuple(value.shape)} in the "
                f"file and {tuple(own[key].shape)} in the model."
            )
    if optimizer is None or "opt" not in state:
        return
    if groups is not None and state.get("groups") not in (None, groups):
        saved = [(g["name"], g["params"]) for g in state["groups"]]
        raise ValueError(
            f"{file}'s optimizer state belongs to layer groups {saved}, but this Learner's are "
            f"{[(g['name'], g['params']) for g in groups]}: the layer groups differ, so the "
            "momentum of one group would land on another's parameters. Use the splitter that "
            "saved it, or load with with_opt=False."
        )
    saved_groups, current = state["opt"]["param_groups"], optimizer.param_groups
    names = [g.get("name") for g in saved_groups], [g.get("name") for g in current]
    sizes = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in current]
    if names[0] != names[1] or sizes[0] != sizes[1]:
        raise ValueError(
            f"{file}'s optimizer state has param groups {list(zip(*[names[0], sizes[0]]))} "
            f"(name, parameters) but this Learner's are {list(zip(*[names[1], sizes[1]]))}; "
            "the layer groups differ, so the momentum of one group would land on another's "
            "parameters. Use the splitter that saved it, or load with with_opt=False."
        )
    params = [p for g in current for p in g["params"]]
    for index, param_state in state["opt"]["state"].items():
        for key, value in param_state.items():
            if (
                isinstance(value, torch.Tensor)
                and value.ndim
                and value.shape != params[index].shape
            ):
                raise ValueError(
                    f"{file}'s optimizer state {key!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(params[index].shape)}; load with "
                    "with_opt=False."
                )


def load_state(
    file: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    groups: list[dict[str, Any]] | None = None,
    strict: bool = True,
) -> list[bool] | None:
    """Load what `write_state` wrote into ``model`` (and ``optimizer``, unless ``None``), all or
    nothing: the file is checked (`check_state_fits`) before anything changes.

    Returns:
        The saved frozen pattern, if the file has one.
    """
    state = read_state(file)
    check_state_fits(state, model, optimizer, file, strict, groups)
    model.load_state_dict(state["model"], strict=strict)
    if optimizer is not None and "opt" in state:
        optimizer.load_state_dict(state["opt"])
    return state.get("frozen")


def export_model(model: nn.Module, file: Path) -> Path:
    """Pickle the whole model (architecture and weights) in eval mode, for inference, atomically.

    The file is a pickle: load it with ``torch.load(file, weights_only=False)``, and only from a
    source you trust (unpickling can run code).
    """
    training = model.training
    model.eval()
    try:
        return atomic_save(model, file)
    finally:
        model.train(training)
