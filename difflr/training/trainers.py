"""The Lightning side of every Trainer a Learner builds: its arguments and how it is made.

`difflr.training.runner.Runner` decides which callbacks a run gets and runs it; this module holds
what every Trainer has in common, whatever the run:

- `check_trainer_kwargs`: the Learner's ``**trainer_kwargs``, checked once, when it is made.
- `trainer_arguments`: difflr's defaults, the user's arguments and the run's overrides, with a
  fresh copy of a strategy instance for each Trainer.
- `wants_live_progress`: whether difflr's live progress line replaces Lightning's bar.
- `check_user_checkpoints`: a user's ``ModelCheckpoint`` may not write into difflr's folder.
- `make_trainer`: the Trainer itself, with atomic checkpoint writes and quiet logs.
- `quiet_lightning`: Lightning's INFO lines, which every fresh Trainer would print again, hidden.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar

from difflr.training.checkpoints import AtomicCheckpointIO, LearnerCheckpoint
from difflr.training.data import loader_length
from difflr.training.sharding import (
    atomic_folder_saves,
    check_strategy,
    fresh_strategy,
    is_sharding_strategy,
)
from difflr.utils.checks import check_int, is_int

__all__ = [
    "RESERVED_TRAINER_ARGS",
    "check_trainer_kwargs",
    "check_user_checkpoints",
    "make_trainer",
    "quiet_lightning",
    "trainer_arguments",
    "wants_live_progress",
]

#: Trainer arguments that each fit sets itself.
RESERVED_TRAINER_ARGS = ("max_epochs", "max_steps", "min_epochs", "min_steps")

#: Lightning loggers whose INFO lines ("GPU available: ...", "`Trainer.fit` stopped ...") would
#: repeat at every fit, since each fit has its own Trainer.
_CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's INFO lines that every fresh Trainer would print again."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_trainer_kwargs(
    trainer_kwargs: Mapping[str, Any] | None, checkpoint: bool | None
) -> dict[str, Any]:
    """The Learner's ``**trainer_kwargs``, checked, with numpy numbers as Python's (Lightning
    asserts ``isinstance(..., int)`` in places).

    Args:
        trainer_kwargs: What the user gave for every Trainer.
        checkpoint: The Learner's ``checkpoint`` argument (``None``: Lightning's switch decides).

    Raises:
        TypeError: They set the length of training, the callbacks or the logger (the Learner's
            own arguments do that).
        ValueError: ``checkpoint=True`` together with ``enable_checkpointing=False``; a strategy
            the Learner cannot drive (`difflr.training.sharding.check_strategy`); a bad
            ``accumulate_grad_batches``.
    """
    kwargs = {k: _plain_number(v) for k, v in (trainer_kwargs or {}).items()}
    check_strategy(kwargs)
    reserved = [k for k in RESERVED_TRAINER_ARGS if k in kwargs]
    if reserved:
        raise TypeError(
            f"Learner got Trainer argument(s) {reserved}; the fit methods set the length of "
            "training: pass n_epoch to fit/fit_one_cycle instead."
        )
    if "callbacks" in kwargs or "logger" in kwargs:
        raise TypeError("pass callbacks= and logger= as the Learner's own arguments.")
    if checkpoint and kwargs.get("enable_checkpointing") is False:
        raise ValueError(
            "checkpoint=True asks for difflr's path/checkpoints/last.ckpt, but "
            "enable_checkpointing=False turns checkpointing off; pass one of them."
        )
    if "accumulate_grad_batches" in kwargs:
        check_int(kwargs["accumulate_grad_batches"], "accumulate_grad_batches", 1)
    return kwargs


def trainer_arguments(
    trainer_kwargs: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    path: Path,
    logger: Any,
    train_dl: Any,
) -> dict[str, Any]:
    """difflr's defaults (no checkpointing, summary or sanity check; a log line per epoch of a
    short loader), then the user's ``trainer_kwargs``, then the run's ``overrides``; a strategy
    instance is copied, since the Trainer it is given spends it.

    Raises:
        ValueError: A strategy the Learner cannot drive.
    """
    kwargs: dict[str, Any] = {
        "logger": logger if logger is not None else False,
        "default_root_dir": str(path),
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    n_batches = loader_length(train_dl)
    if n_batches:
        kwargs["log_every_n_steps"] = max(1, min(50, n_batches))
    kwargs.update(trainer_kwargs)
    kwargs.update(overrides)
    check_strategy(kwargs)
    # A strategy instance is spent by the Trainer it is given: each Trainer gets a copy.
    if "strategy" in kwargs:
        kwargs["strategy"] = atomic_folder_saves(fresh_strategy(kwargs["strategy"]))
    return kwargs


def wants_live_progress(kwargs: Mapping[str, Any], callbacks: Sequence[pl.Callback]) -> bool:
    """Whether a Trainer gets difflr's live progress: unless ``enable_progress_bar=False`` or the
    user brings a progress bar of their own (a Trainer takes one)."""
    enabled = kwargs.get("enable_progress_bar")
    if enabled is not None and not enabled:  # None is Lightning's default: on
        return False
    return not any(isinstance(cb, ProgressBar) for cb in callbacks)


def check_user_checkpoints(callbacks: Sequence[pl.Callback], path: Path, has_logger: bool) -> None:
    """Refuse a user's ``ModelCheckpoint`` that would write into ``path/checkpoints``: its
    ``last.ckpt`` would replace difflr's (NaN weights included) and be what
    ``ckpt_path="last"`` resumes.

    Raises:
        ValueError: Its ``dirpath`` is that folder, or it has none and there is no logger
            (Lightning then writes to ``default_root_dir/checkpoints``, i.e. ``path``'s).
    """
    ours = (path / "checkpoints").resolve()
    for callback in callbacks:
        if not isinstance(callback, ModelCheckpoint) or isinstance(callback, LearnerCheckpoint):
            continue
        if callback.dirpath is None and has_logger:
            continue  # Lightning puts it in the logger's version folder
        target = ours if callback.dirpath is None else Path(callback.dirpath).resolve()
        if target == ours:
            raise ValueError(
                f"your ModelCheckpoint would write into {path / 'checkpoints'}, "
                "difflr's own folder: its last.ckpt would replace the Learner's (the file "
                "ckpt_path='last' resumes). Give it a folder of its own: "
                "ModelCheckpoint(dirpath=...)."
            )


def make_trainer(kwargs: dict[str, Any], callbacks: Sequence[pl.Callback]) -> pl.Trainer:
    """``pl.Trainer(**kwargs, callbacks=callbacks)``, quietly, its checkpoints written atomically
    (`AtomicCheckpointIO`) unless the user's plugins or strategy write them their own way."""
    kwargs["plugins"] = _with_atomic_checkpoint_io(kwargs.get("plugins"), kwargs.get("strategy"))
    kwargs["callbacks"] = list(callbacks)
    with quiet_lightning():
        return pl.Trainer(**kwargs)


def _plain_number(value: Any) -> Any:
    """A numpy integer or float as Python's; anything else as it is."""
    if is_int(value):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _with_atomic_checkpoint_io(plugins: Any, strategy: Any) -> list[Any]:
    """The user's plugins, plus difflr's `AtomicCheckpointIO` unless they bring a CheckpointIO of
    their own or a strategy that saves its own way (a strategy instance, but for a
    ``ModelParallelStrategy`` that writes one file)."""
    plugins = (
        list(plugins) if isinstance(plugins, (list, tuple)) else [plugins] * (plugins is not None)
    )
    if any(isinstance(p, CheckpointIO) for p in plugins):
        return plugins
    if (
        strategy is None
        or (isinstance(strategy, str) and strategy.startswith(("auto", "ddp", "single")))
        # One file gathered on rank 0, written through the CheckpointIO (the flag has no public
        # getter; a folder of shards is written by `atomic_folder_saves` instead).
        or (is_sharding_strategy(strategy) and not strategy._save_distributed_checkpoint)
    ):
        return [*plugins, AtomicCheckpointIO()]
    return plugins
