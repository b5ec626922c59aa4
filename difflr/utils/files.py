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
import math
import os
import pickle
import re
import signal
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from difflr.utils.locks import FolderLock, one_builder

__all__ = [
    "CHECKSUM_KEY",
    "FolderLock",
    "UnreadableFileError",
    "atomic_save",
    "atomic_write",
    "check_state_fits",
    "checksum",
    "export_model",
    "load_state",
    "one_builder",
    "os_error_behind",
    "read_state",
    "remove_stale_temps",
    "safe_load",
    "state_content",
    "state_file",
    "write_state",
]

#: Temp files of unfinished writes start with this; a claimed folder's leftovers can be removed.
TEMP_PREFIX = ".difflr-partial-"

#: The key under which a dict that difflr writes carries the checksum of its content.
CHECKSUM_KEY = "difflr.checksum"


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
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=file.parent)
    except OSError as error:
        raise OSError(
            error.errno,
            f"could not write {file} ({error.strerror or error}); nothing was changed. Free "
            "disk space or choose another path, then save again.",
        ) from error
    temp = Path(temp_name)
    held = _lock_temp(descriptor)
    interrupted: list[int] = []
    try:
        with _sigint_noted() as interrupted, os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, file)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temp.unlink()
        _release(held)
        previous = "is unchanged" if file.exists() else "did not exist and still does not"
        if interrupted and not isinstance(error, KeyboardInterrupt):
            # Ctrl-C inside torch.save's C++ writer comes out as a RuntimeError: give it back
            # as the KeyboardInterrupt it was.
            raise KeyboardInterrupt(
                f"interrupted while writing {file}; the previous {file.name} {previous}."
            ) from None
        cause = os_error_behind(error)
        if cause is not None:
            raise OSError(
                cause.errno,
                f"could not write {file} ({cause.strerror or cause}); the previous {file.name} "
                f"{previous}. Free disk space or choose another path, then save again.",
            ) from error
        raise
    _release(held)
    _sync_folder(file.parent)
    remove_stale_temps(file.parent)  # of earlier writes that were killed
    return file


def _release(held: int | None) -> None:
    if held is not None:
        with contextlib.suppress(OSError):
            os.close(held)


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


class _Noted(list):
    """A flag that is falsy until set (a list, so a closure can set it)."""


@contextlib.contextmanager
def _sigint_noted() -> Iterator[_Noted]:
    """Note whether SIGINT arrived during the body; the handler in place still runs (Python's
    raises ``KeyboardInterrupt``). Main thread only: signals are delivered there."""
    noted = _Noted()
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    previous = signal.getsignal(signal.SIGINT)

    def note(signum: int, frame: Any) -> None:
        noted.append(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def remove_stale_temps(folder: Path, prefixes: tuple[str, ...] = (TEMP_PREFIX,)) -> list[Path]:
    """Remove the temp files that writes killed mid-way left in ``folder``; returns those removed.

    A write holds an ``flock`` on its temp file until the rename, so a temp file whose lock can be
    taken belongs to a process that is gone (the system drops the lock of a killed process). One
    younger than a few seconds is left alone: its writer may not have locked it yet.
    """
    removed: list[Path] = []
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return removed
    now = time.time()
    for prefix in prefixes:
        for leftover in Path(folder).glob(f"{prefix}*"):
            with contextlib.suppress(OSError):
                if leftover.is_symlink() or now - leftover.stat().st_mtime < 5:
                    continue
                descriptor = os.open(leftover, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    leftover.unlink()
                    removed.append(leftover)
                finally:
                    os.close(descriptor)
    return removed


def _lock_temp(descriptor: int) -> int | None:
    """Hold an ``flock`` on a temp file being written (on a dup of its descriptor, kept until the
    rename), so that `remove_stale_temps` tells a live write from a killed one."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    held = os.dup(descriptor)
    fcntl.flock(held, fcntl.LOCK_EX)
    return held


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


def atomic_save(obj: Any, file: Path) -> Path:
    """``torch.save(obj, file)``, atomically (see `atomic_write`); a dict is saved with the
    `checksum` of its content under `CHECKSUM_KEY`, which `safe_load` verifies."""
    if type(obj) is dict:
        obj = {**obj, CHECKSUM_KEY: checksum(obj)}
    return atomic_write(file, lambda handle: torch.save(obj, handle))


def checksum(obj: Any) -> int:
    """CRC-32 of a nested structure as ``torch.load`` gives it back: every tensor's dtype,
    shape and bytes, every plain value (str, int, float, bool, None, bytes) and the nesting.

    It detects corruption (a bit flipped on disk or in a copy, an edited value), not forgery:
    whoever edits a file can recompute it. Its cost: docs/benchmarks.md, section 5.
    """
    crc = 0

    def feed(value: Any) -> None:
        nonlocal crc
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            crc = zlib.crc32(f"T{tensor.dtype}{tuple(tensor.shape)}".encode(), crc)
            if tensor.layout != torch.strided:
                tensor = tensor.to_dense()
            if tensor.device.type == "meta" or tensor.numel() == 0:
                return
            data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            crc = zlib.crc32(data, crc)
        elif isinstance(value, dict):
            crc = zlib.crc32(b"{", crc)
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):
            crc = zlib.crc32(b"[", crc)
            for item in value:
                feed(item)
        elif value is None or isinstance(value, (str, int, float, bytes)):
            crc = zlib.crc32(f"{type(value).__name__}:{value!r}".encode(), crc)
        else:
            crc = zlib.crc32(type(value).__name__.encode(), crc)

    feed(obj)
    return crc


def safe_load(file: Path, what: str = "file", handle: IO[bytes] | None = None) -> Any:
    """``torch.load(file, weights_only=True)`` onto the CPU, with errors that say what to do;
    a dict's `checksum` is verified (and removed) when it carries one.

    Args:
        file: The file to read.
        what: What the file should be, for messages (``"checkpoint"``, ``"saved Learner state"``).
        handle: Read this open file instead (``file`` then only names it in messages).

    Raises:
        FileNotFoundError: No such file.
        UnreadableFileError: The file needs code to be run to load (a crafted or foreign pickle),
            or it is truncated or corrupt (a write killed by an older tool, a full disk).
    """
    file = Path(file)
    if handle is None and not file.is_file():
        raise FileNotFoundError(f"no {what} at {file}.")
    try:
        content = torch.load(
            file if handle is None else handle, map_location="cpu", weights_only=True
        )
    except pickle.UnpicklingError as error:
        if not zipfile.is_zipfile(
            file if handle is None else handle
        ):  # not what torch.save writes: cut short, or not torch's
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
    except Exception as error:  # random bytes fail in many ways: IndexError, struct.error...
        raise UnreadableFileError(
            f"{file} is not a complete {what} ({type(error).__name__}: {error}); it was probably "
            "cut short by a killed process or a full disk, or it is another kind of file. Use an "
            "earlier file, or start anew."
        ) from error
    if isinstance(content, dict) and CHECKSUM_KEY in content:
        saved = content.pop(CHECKSUM_KEY)
        if saved != checksum(content):
            raise UnreadableFileError(
                f"{file} is corrupt: its content does not match the checksum difflr wrote with "
                "it (a bit flipped on disk or in a copy, or the file was edited). Use an earlier "
                "file, or start anew."
            )
    return content


def _telling_line(error: Exception) -> str:
    """The line of a ``weights_only`` refusal that says what the file holds (torch puts advice
    about ``weights_only`` first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [
        line for line in lines if re.search(r"unsupported|global|invalid|load key", line, re.I)
    ]
    line = (telling or lines or [type(error).__name__])[0]
    return line if len(line) <= 200 else line[:200] + "..."


def state_file(models: Path, name: str | Path, suffix: str = ".pth") -> Path:
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
            f"name={name!r} is not a plain file name: save, load and export keep their files "
            "under the Learner's path. Pass a name such as 'stage1', or a pathlib.Path for a "
            "file elsewhere."
        )
    return models / (name if name.endswith(suffix) else f"{name}{suffix}")


def write_state(
    file: Path,
    model: nn.Module,
    frozen: list[bool],
    optimizer: torch.optim.Optimizer | None,
    groups: list[dict[str, Any]] | None = None,
) -> Path:
    """Save the model's weights, the frozen pattern and (unless ``None``) the optimizer state
    with the layer groups it belongs to (`difflr.groups.layers.group_fingerprint`), atomically."""
    opt_state = None if optimizer is None else optimizer.state_dict()
    return atomic_save(state_content(model.state_dict(), frozen, opt_state, groups), file)


def state_content(
    model_state: dict[str, Any],
    frozen: list[bool],
    opt_state: dict[str, Any] | None,
    groups: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What a `write_state` file holds (also a sharded model's, gathered): the weights, the
    frozen pattern and, unless ``opt_state`` is ``None``, the optimizer state with its groups."""
    state: dict[str, Any] = {"model": model_state, "frozen": list(frozen)}
    if opt_state is not None:
        state["opt"] = opt_state
        state["groups"] = groups
    return state


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
    not_tensors = [k for k, v in saved.items() if not isinstance(v, torch.Tensor)]
    if not_tensors or not all(isinstance(k, str) for k in saved):
        raise ValueError(
            f"{file} is not a Learner state: its model entries {not_tensors[:5]} are not tensors "
            "(an edited or foreign file); save it again with learn.save()."
        )
    frozen = state.get("frozen")
    if frozen is not None and not (
        isinstance(frozen, list) and all(isinstance(f, bool) for f in frozen)
    ):
        raise ValueError(
            f"{file}'s frozen pattern is {frozen!r}, not a list of bools (one per layer group); "
            "the file was edited. Save it again with learn.save()."
        )
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
    _check_optimizer_state(state["opt"], optimizer, file)
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


def _check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer, file: Path) -> None:
    """Refuse an optimizer state whose structure or hyper-parameters are not what
    ``optimizer.load_state_dict`` takes: a malformed one would fail half-way, or load an LR such
    as ``'fast'`` that breaks the next step.

    Raises:
        ValueError: Names the entry and what was expected.
    """

    def bad(what: str) -> ValueError:
        return ValueError(
            f"{file}'s optimizer state is malformed ({what}); the file was edited or written by "
            "something else. Load with with_opt=False, or save it again with learn.save()."
        )

    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("state"), dict)
        and isinstance(saved.get("param_groups"), list)
        and all(isinstance(g, dict) for g in saved["param_groups"])
    ):
        raise bad("expected a dict with 'state' and a list of 'param_groups'")
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    for i, group in enumerate(saved["param_groups"]):
        params = group.get("params")
        if not (isinstance(params, list) and all(isinstance(p, int) for p in params)):
            raise bad(f"param_groups[{i}]['params'] is not a list of parameter indices")
        if i >= len(optimizer.param_groups):
            continue  # the count is compared (and named) below
        for key, current in optimizer.param_groups[i].items():
            if key == "params" or key not in group:
                continue
            value = group[key]
            if not _same_kind(value, current):
                raise bad(
                    f"param_groups[{i}][{key!r}] is {value!r}, this optimizer's is {current!r}"
                )
            if key == "lr" and not (
                isinstance(value, torch.Tensor) or (math.isfinite(value) and value >= 0)
            ):
                raise bad(f"param_groups[{i}]['lr'] is {value!r}")
    for index, param_state in saved["state"].items():
        if not (isinstance(index, int) and 0 <= index < n_params and isinstance(param_state, dict)):
            raise bad(f"state entry {index!r} is not a parameter index below {n_params}")


def _same_kind(value: Any, current: Any) -> bool:
    """Whether a saved hyper-parameter is of the kind the optimizer holds there."""
    if isinstance(current, bool) or current is None:
        return isinstance(value, bool) or value is None
    if isinstance(current, (int, float, torch.Tensor)):
        return isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)
    if isinstance(current, (tuple, list)):
        return (
            isinstance(value, (tuple, list))
            and len(value) == len(current)
            and all(_same_kind(v, c) for v, c in zip(value, current))
        )
    return isinstance(value, type(current))


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
    # The optimizer first: torch builds its new state aside and swaps it in at the end, so a
    # refusal there leaves everything as it was; the model's load cannot fail once checked.
    if optimizer is not None and "opt" in state:
        optimizer.load_state_dict(state["opt"])
    model.load_state_dict(state["model"], strict=strict)
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
