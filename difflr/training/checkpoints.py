"""The Learner's checkpoints: written safely, read safely, and resumed only into the fit they
belong to.

- `AtomicCheckpointIO` writes every checkpoint of a Learner's Trainers to a temp file in the
  target's folder and renames it over the target (a kill or a full disk mid-write leaves the
  previous file), and reads them with ``weights_only=True`` (a crafted file cannot run code).
- `LearnerCheckpoint` is difflr's ``last.ckpt`` / ``best.ckpt`` writer: it never replaces a file
  with a model that holds NaN or infinity, and its state key differs from a plain
  ``ModelCheckpoint``'s, so the user's own ``ModelCheckpoint`` works beside it.
- `FitRecord` is what each checkpoint records of its fit (every stage's schedule and LRs,
  gradient accumulation, the layer groups and their parameters, the optimizer), which Learner and
  which fit call wrote it, how far it got, the RNG states and the TensorBoard offsets; it checks
  its fields when it is built or read. `FitState` writes it; `check_resume` refuses a resume that
  does not match, naming the difference.
- `FolderClaim` keeps two Learners from writing checkpoints into one folder at the same time.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override

from difflr.training.sharding import FOLDER_METADATA, is_checkpoint_folder
from difflr.utils.checks import is_int, non_finite_names, user_stacklevel
from difflr.utils.files import (
    UnreadableFileError,
    atomic_save,
    remove_stale_temps,
    safe_load,
)
from difflr.utils.locks import FolderLock
from difflr.utils.rng import RngState, loader_generators

__all__ = [
    "AtomicCheckpointIO",
    "FitRecord",
    "FitState",
    "FolderClaim",
    "LearnerCheckpoint",
    "Resume",
    "check_resume",
    "checkpoint_callbacks",
    "read_fit_state",
    "resolve_checkpoint",
]

#: Bumped when what FitRecord holds changes meaning; older checkpoints are then refused.
FORMAT = 3

#: The ids of the Learners that wrote a checkpoint in this process (see `check_resume`).
_WRITERS: set[str] = set()


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
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hold_sigterm(trainer)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._hold_sigterm(trainer)

    def _hold_sigterm(self, trainer: pl.Trainer) -> None:
        # Lightning stops a validation at SIGTERM, also the one that ends an epoch whose training
        # has finished: that epoch would then be saved mid-way through its end (or not at all),
        # and could not resume exactly. A validation that has begun runs to its end instead; the
        # flag is put back at its end, so the fit stops there (mid-epoch) or after the epoch's
        # checkpoint. Lightning has no public switch for this: the one private access.
        if self.filename != "last" or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        connector = trainer._signal_connector
        if connector.received_sigterm:
            connector.received_sigterm = False
            self._sigterm_held = True

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(self, "_sigterm_held", False):
            trainer._signal_connector.received_sigterm = True  # see _hold_sigterm
            self._sigterm_held = False
        if self._finite(trainer, pl_module):
            super().on_validation_end(trainer, pl_module)

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
                stacklevel=user_stacklevel(),
            )
        return finite


def checkpoint_callbacks(folder: Path, monitor: str | None = None) -> list[pl.Callback]:
    """``folder/last.ckpt`` at each epoch end and, with ``monitor``, ``folder/best.ckpt``."""
    callbacks: list[pl.Callback] = [
        # One file, overwritten at each epoch end (save_last alone only writes at fit end).
        # At the epoch's end, after its validation, whatever val_check_interval and
        # check_val_every_n_epoch say: only an epoch end resumes exactly.
        LearnerCheckpoint(
            dirpath=folder,
            filename="last",
            save_top_k=1,
            enable_version_counter=False,
            save_on_train_epoch_end=True,
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
                save_on_train_epoch_end=True,
            )
        )
    return callbacks


# ------------------------------------------------------------------------------------------------
# What a fit records, and resuming
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitRecord:
    """What a checkpoint records of the fit that wrote it; every field is checked when a record
    is built (`FitRecord.read` for one read from a file).

    Args:
        learner: The id of the Learner that wrote it.
        run: The id of the fit call.
        stage: The index of the stage it was written in, in ``[0, n_stages)``.
        plan: What defines the fit (see `check_resume`): ``stages`` (each a dict with at least
            ``epochs``), ``groups``, ``accumulate_grad_batches``, ``steps_per_epoch``, ``optimizer``.
        frozen: The stage's frozen pattern, one bool per layer group.
        offsets: The logger's step and epoch offsets when the stage started (two ints >= 0).
        epochs_done: Epochs of the stage whose training had finished when it was written.
        at_epoch_end: Whether it was written at an epoch's end (only those resume exactly).
        rng: The RNG states (with the data loaders' generators); ``None`` before a save.
        found_lrs: ``{stage: lr}``, the LR found by the range test of each stage up to this one
            whose ``lr_max`` names a suggestion (``Stage(lr_max="valley")``): a resume uses them
            instead of sweeping again.

    Raises:
        ValueError: A field is missing, of the wrong type or out of range (an edited file).
    """

    learner: str
    run: str
    stage: int
    plan: dict[str, Any]
    frozen: tuple[bool, ...] = ()
    offsets: tuple[int, int] = (0, 0)
    epochs_done: int = 0
    at_epoch_end: bool = True
    rng: RngState | None = None
    found_lrs: Mapping[int, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, expected: str) -> ValueError:
            return ValueError(
                f"the fit record's {field} is {value!r}, expected {expected}; the checkpoint was "
                "edited or written by something else. Start the fit anew, or resume from an "
                "earlier checkpoint."
            )

        for name in ("learner", "run"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, getattr(self, name), "a str")
        plan = self.plan
        stages = plan.get("stages") if isinstance(plan, Mapping) else None
        if not (
            isinstance(stages, Sequence)
            and stages
            and all(
                isinstance(st, Mapping) and is_int(st.get("epochs")) and st["epochs"] >= 1
                for st in stages
            )
            and isinstance(plan.get("groups"), Sequence)
        ):
            raise bad("plan", "malformed", "stages (each with epochs >= 1) and groups")
        if not (is_int(self.stage) and 0 <= self.stage < len(stages)):
            raise bad("stage", self.stage, f"an int in [0, {len(stages)})")
        frozen = self.frozen
        if not (
            isinstance(frozen, Sequence)
            and all(isinstance(f, bool) for f in frozen)
            and (not frozen or len(frozen) == len(plan["groups"]))
        ):
            raise bad("frozen", frozen, f"{len(plan['groups'])} bools (one per layer group)")
        if not (
            isinstance(self.offsets, Sequence)
            and len(self.offsets) == 2
            and all(is_int(v) and v >= 0 for v in self.offsets)
        ):
            raise bad("offsets", self.offsets, "two ints >= 0")
        epochs = stages[self.stage]["epochs"]
        if not (is_int(self.epochs_done) and 0 <= self.epochs_done <= epochs):
            raise bad("epochs_done", self.epochs_done, f"an int in [0, {epochs}]")
        if not isinstance(self.at_epoch_end, bool):
            raise bad("at_epoch_end", self.at_epoch_end, "a bool")
        if self.rng is not None and not isinstance(self.rng, RngState):
            raise bad("rng", type(self.rng).__name__, "an RngState")
        found = self.found_lrs
        if not isinstance(found, Mapping) or not all(
            is_int(k) and 0 <= k <= self.stage and isinstance(v, float) and 0 < v < math.inf
            for k, v in found.items()
        ):
            raise bad("found_lrs", found, f"{{stage: lr > 0}} for stages in [0, {self.stage}]")

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain values and tensors, as a checkpoint holds them (``weights_only=True``)."""
        return {
            "format": FORMAT,
            "learner": self.learner,
            "run": self.run,
            "stage": self.stage,
            "n_stages": len(self.plan["stages"]),
            "plan": self.plan,
            "frozen": list(self.frozen),
            "offsets": list(self.offsets),
            "epochs_done": self.epochs_done,
            "at_epoch_end": self.at_epoch_end,
            "rng": None if self.rng is None else self.rng.to_record(),
            "found_lrs": dict(self.found_lrs),
        }

    @classmethod
    def read(cls, state: Any, path: Path) -> FitRecord:
        """The record a checkpoint at ``path`` holds under ``"difflr"``, checked.

        Raises:
            ValueError: It is not a fit record of this difflr, or a field is malformed.
        """
        if not isinstance(state, dict):
            raise ValueError(
                f"{path} was not written by a Learner fit (it holds no difflr fit record); resume "
                "it with trainer.fit(..., ckpt_path=...) or load weights with learn.load()."
            )
        if state.get("format") != FORMAT:
            raise ValueError(
                f"{path} was written by another version of difflr (checkpoint format "
                f"{state.get('format')!r}, this one reads {FORMAT}); start the fit anew."
            )
        fields = ("learner", "run", "stage", "plan", "frozen", "offsets", "epochs_done")
        missing = [f for f in (*fields, "at_epoch_end", "rng", "n_stages") if f not in state]
        if missing:
            raise ValueError(f"{path}'s fit record lacks {missing}; start the fit anew.")
        try:
            record = cls(
                **{f: state[f] for f in fields},
                at_epoch_end=state["at_epoch_end"],
                rng=RngState.from_record(state["rng"], str(path)),
                found_lrs=state.get("found_lrs", {}),  # absent: none (older records)
            )
        except (TypeError, AttributeError) as error:  # a field of an unexpected kind
            raise ValueError(f"{path}'s fit record is malformed ({error}).") from None
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if state["n_stages"] != len(record.plan["stages"]) or record.epochs_done < 1:
            raise ValueError(
                f"{path}'s fit record is malformed (n_stages {state['n_stages']!r}, epochs_done "
                f"{record.epochs_done!r}); start the fit anew."
            )
        return record


class FitState(Callback):
    """Writes a `FitRecord` into every checkpoint of a Learner's fit, and restores the RNG
    states (the data loaders' generators included) when a fit resumes from one.

    Args:
        record: The fit's record; the epochs done, the RNG states and whether the save happens at
            an epoch's end are filled in at each save.
        loaders: The fit's data loaders (training, validation), whose generators
            (``DataLoader(generator=...)``, a sampler's own) are saved and restored with the
            global ones. Lightning draws the first epoch's order before any hook but the
            checkpoint's, so they must be known beforehand: a ``LightningDataModule`` builds its
            loaders inside the fit, and theirs are not restored.
    """

    def __init__(self, record: FitRecord, loaders: Sequence[Any] = ()) -> None:
        self.record = record
        self.loaders = [loader for loader in loaders if loader is not None]
        self._at_epoch_end = False

    @property
    @override
    def state_key(self) -> str:
        return "difflr.FitState"

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._at_epoch_end = False

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._at_epoch_end = False

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before any ModelCheckpoint's (Lightning puts those last).
        self._at_epoch_end = True

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        _WRITERS.add(self.record.learner)
        record = dataclasses.replace(
            self.record,
            epochs_done=trainer.current_epoch + int(self._at_epoch_end),
            at_epoch_end=self._at_epoch_end,
            rng=RngState.capture(self._generators()),
        )
        checkpoint["difflr"] = record.to_checkpoint()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Restored before Lightning makes the first epoch's iterator (it draws the order then),
        # so a shuffling loader draws the order the uninterrupted run drew. The record was read
        # and checked by resume_point before the fit began.
        state = checkpoint.get("difflr")
        if isinstance(state, dict) and state.get("rng") is not None:
            RngState.from_record(state["rng"]).restore(self._generators())

    def _generators(self) -> list[torch.Generator]:
        return [g for loader in self.loaders for g in loader_generators(loader)]


@dataclass(frozen=True)
class Resume:
    """Where a fit resumes: the checkpoint, its stage and frozen pattern, the fit call's id, the
    timeline offsets when that stage started and the LRs found so far (`FitRecord.found_lrs`)."""

    path: Path
    stage: int
    frozen: list[bool]
    run: str
    offsets: list[int]
    found_lrs: dict[int, float] = dataclasses.field(default_factory=dict)


def read_fit_state(path: Path) -> FitRecord:
    """The `FitRecord` a checkpoint holds, checked.

    Raises:
        UnreadableFileError: The file is not a plain, complete checkpoint.
        ValueError: The checkpoint was not written by a Learner fit, by an older difflr, or its
            record is malformed.
    """
    # A distributed checkpoint (a folder of shards) keeps everything else in its meta.pt.
    file = path / FOLDER_METADATA if is_checkpoint_folder(path) else path
    checkpoint = safe_load(file, "checkpoint")
    if not isinstance(checkpoint, dict):
        raise UnreadableFileError(
            f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}, not "
            "a dict); pass a .ckpt file written by a fit."
        )
    return FitRecord.read(checkpoint.get("difflr"), path)


def check_resume(
    state: FitRecord,
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
            ``accumulate_grad_batches``, ``steps_per_epoch``, ``groups`` (each layer group's
            name, parameter names and shapes) and ``optimizer`` (its class and param groups).
        learner: The id of the Learner that resumes.
        last_run: The id of that Learner's last fit call in this process (``None`` if it has not
            fitted yet, e.g. a fresh process after a crash).
        path: The checkpoint, for messages.

    Returns:
        The stage the checkpoint was written in, and its frozen pattern.

    Raises:
        ValueError: The checkpoint belongs to another Learner that has fitted in this process, to
            an earlier fit of this one, to a fit defined differently (the differences are named),
            to a fit that had finished, or it was written mid-epoch.

    Warns:
        UserWarning: This Learner has not fitted yet and another Learner of this process wrote
            the checkpoint (a Learner re-created after a crash): it is resumed, and the warning
            names the other fit.
    """
    if last_run is not None and state.learner != learner:
        raise ValueError(
            f"{path} was written by another Learner (two Learners with one path= share "
            "path/checkpoints); resuming would load that Learner's weights into this one. Give "
            "each Learner its own path=, or start this fit anew."
        )
    if last_run is not None and state.run != last_run:
        raise ValueError(
            f"{path} was written by an earlier fit of this Learner, not by its last one (which "
            "stopped before its first epoch ended, so nothing of it was saved). Start that fit "
            "again without ckpt_path."
        )
    differences = _differences(state.plan, plan)
    if differences:
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        raise ValueError(
            f"{path} was written by a different fit: {shown}. Resume with the same method and "
            "arguments (and Learner) that wrote it, or start the fit anew without ckpt_path."
        )
    stage, n_stages = state.stage, len(plan["stages"])
    if not state.at_epoch_end:
        raise ValueError(
            f"{path} was written in the middle of an epoch (epoch {state.epochs_done} of stage "
            f"{stage}: by a validation that val_check_interval placed inside the epoch, or by "
            "your own ModelCheckpoint), and Lightning restarts a DataLoader at its first batch, "
            "so the resume could not be exact. Resume from path/checkpoints/last.ckpt "
            "(ckpt_path='last'), which difflr writes at epoch ends."
        )
    if stage == n_stages - 1 and state.epochs_done >= plan["stages"][stage]["epochs"]:
        raise ValueError(
            f"{path} holds a fit that had finished (all {state.epochs_done} epochs of its last "
            "stage), so there is nothing to resume; load its weights with learn.load(), or start "
            "a new fit."
        )
    if last_run is None and state.learner != learner and state.learner in _WRITERS:
        warnings.warn(
            f"resuming {path}, written by another Learner of this process (Learner "
            f"{state.learner[:8]}, fit {state.run[:8]}, {state.epochs_done} epoch(s) of stage "
            f"{stage} done) into this one, which has not fitted yet: right for a Learner "
            "re-created after a crash. If the other Learner is still in use, give each its own "
            "path=.",
            stacklevel=user_stacklevel(),
        )
    return stage, list(state.frozen)


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
    """While a fit writes checkpoints into ``folder``, it holds ``folder/.claim`` (an ``flock``,
    `difflr.utils.locks.FolderLock`, naming its Learner and process).

    A second Learner that starts a fit on the same folder at the same time (in another process,
    or in this one) is refused instead of overwriting the first one's ``last.ckpt``. The system
    drops the lock when its process ends or is killed, so a claim is never left stale and a
    reused process id cannot fool it; the temp files of writes killed mid-way are removed when
    the folder is claimed.

    Args:
        folder: The checkpoint folder.
        owner: The claiming Learner's id.

    Raises:
        RuntimeError: (on entry) another Learner holds the folder.
        OSError: (on entry) the claim file cannot be written; the message names it.
    """

    def __init__(self, folder: Path, owner: str) -> None:
        self.folder, self.owner = Path(folder), owner
        self.file = self.folder / ".claim"
        self._lock = FolderLock(self.file, owner)

    def __enter__(self) -> FolderClaim:
        if not self._lock.acquire(wait=False):
            holder = self._lock.holder()
            raise RuntimeError(
                f"{self.folder} is in use by another Learner's fit (process "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}); two Learners would "
                "overwrite each other's last.ckpt. Give each Learner its own path=, or wait for "
                "that fit to end."
            )
        remove_stale_temps(self.folder)  # writes killed mid-way
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
