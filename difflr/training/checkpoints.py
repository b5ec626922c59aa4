"""The Learner's checkpoints: written safely, read safely, and resumed only into the fit they
belong to.

- `AtomicCheckpointIO` writes every checkpoint of a Learner's Trainers to a temp file in the
  target's folder and renames it over the target (a kill or a full disk mid-write leaves the
  previous file), and reads them with ``weights_only=True`` (a crafted file cannot run code).
- `LearnerCheckpoint` is difflr's ``last.ckpt`` / ``best.ckpt`` writer: it never replaces a file
  with a model that holds NaN or infinity, and its state key differs from a plain
  ``ModelCheckpoint``'s, so the user's own ``ModelCheckpoint`` works beside it.
- `FitState` records in each checkpoint what defines the fit (every stage's schedule and LRs,
  gradient accumulation, the layer groups and their parameters), which Learner and which fit call
  wrote it, how far it got, the RNG states and the TensorBoard offsets; `check_resume` refuses a
  resume that does not match, naming the difference.
- `FolderClaim` keeps two Learners from writing checkpoints into one folder at the same time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override

from difflr.training.sharding import FOLDER_METADATA, is_checkpoint_folder
from difflr.utils.checks import non_finite_names
from difflr.utils.files import TEMP_PREFIX, UnreadableFileError, atomic_save, safe_load

__all__ = [
    "AtomicCheckpointIO",
    "FitState",
    "FolderClaim",
    "LearnerCheckpoint",
    "Resume",
    "check_resume",
    "checkpoint_callbacks",
    "read_fit_state",
    "resolve_checkpoint",
]

#: Bumped when what FitState records changes meaning; older checkpoints are then refused.
FORMAT = 2


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing atomically next to the target and reading with
    ``weights_only=True`` (see `difflr.utils.files`)."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "Trainer.save_checkpoint(..., storage_options=...) is not supported by difflr's "
                "AtomicCheckpointIO; pass your own CheckpointIO in plugins= to use it."
            )
        atomic_save(checkpoint, Path(path))

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        checkpoint = safe_load(Path(path), "checkpoint")
        if not isinstance(checkpoint, dict):
            raise UnreadableFileError(
                f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}, "
                "not a dict); pass a .ckpt file written by a fit."
            )
        return checkpoint


class LearnerCheckpoint(ModelCheckpoint):
    """difflr's ``last.ckpt``/``best.ckpt`` writer: a ``ModelCheckpoint`` that skips a save
    while the model holds NaN or infinity (the file keeps the last finite state, and a warning
    says so), with a state key of its own so a user's ``ModelCheckpoint`` can run beside it."""

    @property
    @override
    def state_key(self) -> str:
        return f"difflr.{super().state_key}"

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._finite(trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._finite(trainer, pl_module):
            super().on_validation_end(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # On SIGTERM Lightning stops inside the validation that follows the epoch's training,
        # before the checkpoint an epoch end writes: save the finished training epoch first.
        if (
            trainer.received_sigterm
            and self.filename == "last"
            and not trainer.sanity_checking
            and self._finite(trainer, pl_module)
        ):
            trainer.save_checkpoint(Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}")

    def _finite(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if trainer.sanity_checking:
            return True
        bad = non_finite_names(chain(pl_module.named_parameters(), pl_module.named_buffers()))
        # Every rank must take the same decision: saving is collective under DDP.
        finite = trainer.strategy.reduce_boolean_decision(not bad, all=True)
        if not finite and trainer.is_global_zero:
            target = Path(self.dirpath or ".") / f"{self.filename}{self.FILE_EXTENSION}"
            warnings.warn(
                f"not writing {target}: the model holds NaN or infinity"
                + (f" ({', '.join(bad)})" if bad else " on another rank")
                + f" after epoch {trainer.current_epoch}; the file keeps the last finite state. "
                "Lower the LR, check the data, or keep check_finite on.",
                stacklevel=2,
            )
        return finite


def checkpoint_callbacks(folder: Path, monitor: str | None = None) -> list[pl.Callback]:
    """``folder/last.ckpt`` at each epoch end and, with ``monitor``, ``folder/best.ckpt``."""
    callbacks: list[pl.Callback] = [
        # One file, overwritten at each epoch end (save_last alone only writes at fit end).
        LearnerCheckpoint(
            dirpath=folder, filename="last", save_top_k=1, enable_version_counter=False
        )
    ]
    if monitor is not None:
        callbacks.append(
            LearnerCheckpoint(
                dirpath=folder,
                filename="best",
                monitor=monitor,
                mode="min" if "loss" in monitor else "max",
                save_top_k=1,
                enable_version_counter=False,
            )
        )
    return callbacks


# ------------------------------------------------------------------------------------------------
# What a fit records, and resuming
# ------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and python RNG states, as plain values and tensors."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class FitState(Callback):
    """Writes, into every checkpoint of a Learner's fit, what defines the fit and how far it got,
    and restores the RNG states when a fit resumes from one.

    Args:
        record: Plain values: ``learner`` and ``run`` (ids), ``stage`` and ``n_stages``,
            ``frozen`` (the stage's pattern), ``plan`` (see `check_resume`) and ``offsets`` (the
            logger's step and epoch offsets when the stage started).
    """

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = dict(record)

    @property
    @override
    def state_key(self) -> str:
        return "difflr.FitState"

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["difflr"] = {
            **self.record,
            "format": FORMAT,
            # Learner checkpoints are written at epoch ends, after the epoch's training.
            "epochs_done": trainer.current_epoch + 1,
            "rng": rng_state(),
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Restored before the first batch is drawn, so a shuffling loader draws the order the
        # uninterrupted run drew.
        state = checkpoint.get("difflr", {})
        if "rng" in state:
            set_rng_state(state["rng"])


@dataclass(frozen=True)
class Resume:
    """Where a fit resumes: the checkpoint, its stage and frozen pattern, the fit call's id and
    the timeline offsets when that stage started."""

    path: Path
    stage: int
    frozen: list[bool]
    run: str
    offsets: list[int]


def read_fit_state(path: Path) -> dict[str, Any]:
    """What `FitState` recorded in a checkpoint.

    Raises:
        UnreadableFileError: The file is not a plain, complete checkpoint.
        ValueError: The checkpoint was not written by a Learner fit, or by an older difflr.
    """
    # A distributed checkpoint (a folder of shards) keeps everything else in its meta.pt.
    file = path / FOLDER_METADATA if is_checkpoint_folder(path) else path
    checkpoint = safe_load(file, "checkpoint")
    if not isinstance(checkpoint, dict):
        raise UnreadableFileError(
            f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}, not "
            "a dict); pass a .ckpt file written by a fit."
        )
    state = checkpoint.get("difflr")
    if not isinstance(state, dict):
        raise ValueError(
            f"{path} was not written by a Learner fit (it holds no difflr fit record); resume it "
            "with trainer.fit(..., ckpt_path=...) or load weights with learn.load()."
        )
    if state.get("format") != FORMAT:
        raise ValueError(
            f"{path} was written by another version of difflr (checkpoint format "
            f"{state.get('format')!r}, this one reads {FORMAT}); start the fit anew."
        )
    return state


def check_resume(
    state: Mapping[str, Any],
    plan: Mapping[str, Any],
    *,
    learner: str,
    last_run: str | None,
    path: Path,
) -> tuple[int, list[bool]]:
    """Refuse a resume that would not continue the fit that wrote the checkpoint.

    Args:
        state: From `read_fit_state`.
        plan: What defines the fit being asked for (`difflr.training.runner.Runner.describe_fit`):
            ``stages`` (each stage's schedule, epochs, freeze pattern, LRs per group, ...),
            ``accumulate_grad_batches``, ``steps_per_epoch`` and ``groups`` (each layer group's
            name, parameter names and shapes).
        learner: The id of the Learner that resumes.
        last_run: The id of that Learner's last fit call in this process (``None`` if it has not
            fitted yet, e.g. a fresh process after a crash).
        path: The checkpoint, for messages.

    Returns:
        The stage the checkpoint was written in, and its frozen pattern.

    Raises:
        ValueError: The checkpoint belongs to another Learner, to an earlier fit of this one, to
            a fit defined differently (the differences are named) or to a fit that had finished.
    """
    if last_run is not None and state["learner"] != learner:
        raise ValueError(
            f"{path} was written by another Learner (two Learners with one path= share "
            "path/checkpoints); resuming would load that Learner's weights into this one. Give "
            "each Learner its own path=, or start this fit anew."
        )
    if last_run is not None and state["run"] != last_run:
        raise ValueError(
            f"{path} was written by an earlier fit of this Learner, not by its last one (which "
            "stopped before its first epoch ended, so nothing of it was saved). Start that fit "
            "again without ckpt_path."
        )
    differences = _differences(state["plan"], plan)
    if differences:
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        raise ValueError(
            f"{path} was written by a different fit: {shown}. Resume with the same method and "
            "arguments (and Learner) that wrote it, or start the fit anew without ckpt_path."
        )
    stage, n_stages = int(state["stage"]), len(plan["stages"])
    if stage == n_stages - 1 and state["epochs_done"] >= plan["stages"][stage]["epochs"]:
        raise ValueError(
            f"{path} holds a fit that had finished (all {state['epochs_done']} epochs of its last "
            "stage), so there is nothing to resume; load its weights with learn.load(), or start "
            "a new fit."
        )
    return stage, list(state["frozen"])


def _differences(saved: Any, wanted: Any, where: str = "") -> list[str]:
    """Human-readable paths where two plain structures differ."""
    if isinstance(saved, Mapping) and isinstance(wanted, Mapping):
        found = []
        for key in list(saved) + [k for k in wanted if k not in saved]:
            label = f"{where}.{key}" if where else str(key)
            if key not in saved or key not in wanted:
                found.append(
                    f"{label} is only in {'this call' if key in wanted else 'the checkpoint'}"
                )
            else:
                found += _differences(saved[key], wanted[key], label)
        return found
    if isinstance(saved, Sequence) and isinstance(wanted, Sequence) and not isinstance(saved, str):
        if len(saved) != len(wanted):
            return [
                f"{where} has {len(saved)} entries in the checkpoint, {len(wanted)} in this call"
            ]
        found = []
        for i, (a, b) in enumerate(zip(saved, wanted)):
            found += _differences(a, b, f"{where}[{i}]")
        return found
    same = (
        math.isclose(saved, wanted, rel_tol=1e-12)
        if isinstance(saved, float) and isinstance(wanted, float)
        else saved == wanted
    )
    return [] if same else [f"{where} is {saved!r} in the checkpoint, {wanted!r} in this call"]


def resolve_checkpoint(folder: Path, ckpt_path: str | Path) -> Path:
    """The file ``ckpt_path`` names: ``"last"`` is ``folder/last.ckpt``.

    Raises:
        FileNotFoundError: There is no such file.
    """
    path = folder / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not (path.is_file() or is_checkpoint_folder(path)):
        raise FileNotFoundError(
            f"ckpt_path={str(ckpt_path)!r}: no checkpoint at {path}; pass the path of a .ckpt "
            "file (or distributed-checkpoint folder), or 'last' for the Learner's "
            "path/checkpoints/last.ckpt."
        )
    return path


# ------------------------------------------------------------------------------------------------
# One writer per folder
# ------------------------------------------------------------------------------------------------


class FolderClaim:
    """While a fit writes checkpoints into ``folder``, ``folder/.claim`` names its Learner.

    A second Learner that starts a fit on the same folder at the same time (in another process,
    or in this one) is refused instead of overwriting the first one's ``last.ckpt``. A claim left
    by a process that no longer runs is taken over, and the temp files of its unfinished writes
    are removed.

    Args:
        folder: The checkpoint folder.
        owner: The claiming Learner's id.

    Raises:
        RuntimeError: (on entry) another live Learner holds the folder.
    """

    def __init__(self, folder: Path, owner: str) -> None:
        self.folder, self.owner = Path(folder), owner
        self.file = self.folder / ".claim"
        self._held = False

    def __enter__(self) -> FolderClaim:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "owner": self.owner}
        try:
            descriptor = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._holder()
            if holder is not None and self._alive(holder) and holder.get("owner") != self.owner:
                raise RuntimeError(
                    f"{self.folder} is in use by another Learner's fit (process "
                    f"{holder.get('pid')} on {holder.get('host')}); two Learners would overwrite "
                    f"each other's last.ckpt. Give each Learner its own path= (or, if no such "
                    f"fit runs, delete {self.file})."
                ) from None
            self.file.unlink(missing_ok=True)
            descriptor = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(me, handle)
        self._held = True
        for leftover in self.folder.glob(f"{TEMP_PREFIX}*"):  # writes killed mid-way
            with contextlib.suppress(OSError):
                leftover.unlink()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            with contextlib.suppress(OSError):
                self.file.unlink()
            self._held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None  # unreadable: a claim cut short by a kill

    @staticmethod
    def _alive(holder: Mapping[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # another machine's process cannot be checked: assume it runs
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
