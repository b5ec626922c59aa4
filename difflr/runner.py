"""Running Lightning Trainers for a Learner: one place builds them and runs them.

Every fit, every stage of a plan and every ``lr_find`` gets a fresh ``Trainer`` (so that freezing
is in place before a DDP wrapper sees the model), built by `Runner.trainer` from the Learner's
arguments and run by `Runner.fit`: with the Learner's optimizer, quiet logs, a clean
``KeyboardInterrupt`` on Ctrl-C, and one TensorBoard timeline across calls. ``lr_find`` and
later analysis tools use the same two methods; they are the Learner's public seam to Lightning
(``learn.runner``).
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.progress import ProgressBar

from difflr.callbacks import FiniteLossGuard, ParamScheduler, Recorder
from difflr.checkpoints import checkpoint_callbacks
from difflr.data import Data, loader_length
from difflr.distributed import (
    SyncBuffers,
    batches_per_process,
    check_fit_in_process,
    planned_world_size,
)
from difflr.loggers import ContinuousLogger
from difflr.module import LearnerModule
from difflr.progress import LiveProgress, ProgressTable
from difflr.stages import steps_per_epoch

__all__ = ["Runner", "quiet_lightning"]

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


def _wants_live_progress(kwargs: Mapping[str, Any], callbacks: Sequence[pl.Callback]) -> bool:
    """Whether a Trainer gets difflr's live progress: unless ``enable_progress_bar=False`` or the
    user brings a progress bar of their own (a Trainer takes one)."""
    enabled = kwargs.get("enable_progress_bar")
    if enabled is not None and not enabled:  # None is Lightning's default: on
        return False
    return not any(isinstance(cb, ProgressBar) for cb in callbacks)


class Runner:
    """Builds and runs the Trainers of one Learner.

    Args:
        module: The ``LightningModule`` that trains (a `LearnerModule` or the user's).
        optimizer: The Learner's optimizer, handed to every Trainer.
        data: Where the batches come from.
        path: Root folder for logs and checkpoints.
        logger: One timeline for every fit, or ``None``.
        recorder: Records every step of every fit.
        callbacks: The user's callbacks, given to every fit's Trainer.
        checkpoint: Write ``path/checkpoints/last.ckpt`` at each epoch end.
        monitor: Also keep ``path/checkpoints/best.ckpt`` by this logged metric.
        check_finite: Stop at a non-finite training loss (see `FiniteLossGuard`).
        trainer_kwargs: Passed to every Trainer.

    Raises:
        TypeError: ``trainer_kwargs`` sets the length of training, the callbacks or the logger
            (the Learner's own arguments do that).
    """

    def __init__(
        self,
        module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        data: Data,
        *,
        path: Path,
        logger: ContinuousLogger | None,
        recorder: Recorder,
        callbacks: Sequence[pl.Callback] = (),
        checkpoint: bool = True,
        monitor: str | None = None,
        check_finite: bool = True,
        trainer_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        trainer_kwargs = dict(trainer_kwargs or {})
        reserved = [k for k in RESERVED_TRAINER_ARGS if k in trainer_kwargs]
        if reserved:
            raise TypeError(
                f"Learner got Trainer argument(s) {reserved}; the fit methods set the length of "
                "training: pass n_epoch to fit/fit_one_cycle instead."
            )
        if "callbacks" in trainer_kwargs or "logger" in trainer_kwargs:
            raise TypeError("pass callbacks= and logger= as the Learner's own arguments.")
        self.module = module
        self.optimizer = optimizer
        self.data = data
        self.path = Path(path)
        self.logger = logger
        self.recorder = recorder
        self.table = ProgressTable(recorder)
        self.callbacks = list(callbacks)
        self.checkpoint = checkpoint
        self.monitor = monitor
        self.check_finite = check_finite
        self.trainer_kwargs = trainer_kwargs
        self._notified_optimizer = False

    def trainer(
        self,
        callbacks: Sequence[pl.Callback] = (),
        *,
        standard: bool = True,
        progress_label: str | None = None,
        **overrides: Any,
    ) -> pl.Trainer:
        """A fresh Trainer with the Learner's arguments.

        Args:
            callbacks: This run's own callbacks (its scheduler), placed first.
            standard: Add the epoch table, the NaN guard, the user's callbacks and the
                checkpoints (a fit); ``False`` for a run that is not one (``lr_find``). The
                recorder is always added, and the live progress line (`LiveProgress`, which
                then shows the table) unless ``enable_progress_bar=False`` or the user's
                callbacks hold a progress bar of their own.
            progress_label: What the live progress line calls the run (``None``: the epoch).
            **overrides: Trainer arguments that win over the Learner's.
        """
        kwargs: dict[str, Any] = {
            "logger": self.logger if self.logger is not None else False,
            "default_root_dir": str(self.path),
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        }
        n_batches = loader_length(self.data.train_dl)
        if n_batches:
            kwargs["log_every_n_steps"] = max(1, min(50, n_batches))
        kwargs.update(self.trainer_kwargs)
        kwargs.update(overrides)
        extra: list[pl.Callback] = [self.recorder]
        live = None
        if _wants_live_progress(kwargs, [*callbacks, *(self.callbacks if standard else ())]):
            # Lightning takes it instead of its own bar; it shows the table's rows too.
            kwargs["enable_progress_bar"] = True
            live = LiveProgress(self.table if standard else None, label=progress_label)
            extra.append(live)  # after the recorder: it shows the row the recorder just made
        if standard:
            extra += [*([self.table] if live is None else []), *self.callbacks]
            if self.check_finite:
                extra.append(FiniteLossGuard())
            if self.checkpoint:
                extra += checkpoint_callbacks(self.path / "checkpoints", self.monitor)
                kwargs["enable_checkpointing"] = True
        # SyncBuffers: every DDP rank ends the fit with rank 0's BatchNorm statistics.
        kwargs["callbacks"] = [SyncBuffers(), *callbacks, *extra]
        with quiet_lightning():
            trainer = pl.Trainer(**kwargs)
        check_fit_in_process(trainer)
        return trainer

    def fit(
        self,
        trainer: pl.Trainer,
        scheduler: ParamScheduler,
        *,
        log: bool = True,
        ckpt_path: str | Path | None = None,
    ) -> None:
        """``trainer.fit`` with the Learner's optimizer, quiet logs and a clean interrupt.

        Args:
            trainer: From `trainer`.
            scheduler: The run's scheduler (its step count moves the timeline on).
            log: ``False`` keeps the run off the TensorBoard timeline (``lr_find``).
            ckpt_path: Resume from this checkpoint.

        Raises:
            KeyboardInterrupt: Ctrl-C (Lightning would raise ``SystemExit``).
        """
        handler = signal.getsignal(signal.SIGINT)
        # Lightning 2 keeps the module's train/eval mode; a fit trains (as fastai's does).
        self.module.train()
        try:
            with quiet_lightning(), self._supersede_optimizer(), warnings.catch_warnings():
                # LearnerModule always defines validation_step; no valid_dl is not a mistake.
                warnings.filterwarnings(
                    "ignore", ".*`validation_step` but have no `val_dataloader`"
                )
                # Raised inside Lightning itself on recent torch; nothing a user can act on.
                warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)")
                # Every fit writes path/checkpoints/last.ckpt anew, by design.
                warnings.filterwarnings(
                    "ignore", r"Checkpoint directory .* exists and is not empty"
                )
                trainer.fit(
                    self.module,
                    **self.data.fit_kwargs(),
                    ckpt_path=None if ckpt_path is None else str(ckpt_path),
                )
        except SystemExit:
            # Lightning turns Ctrl-C into SystemExit (it would end a notebook's kernel or a
            # script's later cleanup); give the user back the KeyboardInterrupt they raised.
            if trainer.interrupted:
                raise KeyboardInterrupt(
                    f"fit interrupted after {scheduler.step} optimizer steps; the Learner keeps "
                    "the weights and the recorder keeps the steps done."
                ) from None
            raise
        finally:
            # Lightning ignores SIGINT while it shuts down after an interrupt; restore it.
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, handler)
            if log and self.logger is not None:
                self.logger.step_offset += scheduler.step
                self.logger.epoch_offset += trainer.current_epoch

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch in one process, as the Trainer will count them.

        Raises:
            ValueError: The training data has no length.
        """
        loader = self.data.train_loader(self.module)
        if loader_length(loader) is None:
            raise ValueError(
                "cannot preview: the training data has no length; preview needs len(train_dl)."
            )
        # Under a distributed strategy each process trains on its shard of the data.
        with quiet_lightning():
            world_size = planned_world_size(self.trainer_kwargs)
        n = batches_per_process(
            loader, world_size, self.trainer_kwargs.get("use_distributed_sampler", True)
        )
        limit = self.trainer_kwargs.get("limit_train_batches")
        if isinstance(limit, int) and not isinstance(limit, bool):
            n = min(n, limit)
        elif isinstance(limit, float):
            n = int(n * limit)
        return steps_per_epoch(n, self.trainer_kwargs.get("accumulate_grad_batches", 1))

    @contextmanager
    def _supersede_optimizer(self) -> Iterator[None]:
        """Make a user's LightningModule train with the Learner's optimizer.

        The module's own ``configure_optimizers`` is shadowed by an instance attribute for the
        length of one fit and restored afterwards (the class is never touched).
        """
        if isinstance(self.module, LearnerModule):
            yield
            return
        if not self._notified_optimizer:
            warnings.warn(
                f"{type(self.module).__name__}.configure_optimizers is superseded by the "
                f"Learner's {type(self.optimizer).__name__} with one param group per layer "
                "group; pass opt_func= to the Learner to choose the optimizer.",
                stacklevel=6,  # the user's fit call
            )
            self._notified_optimizer = True
        module = self.module
        own = module.__dict__.get("configure_optimizers")
        module.configure_optimizers = lambda: self.optimizer
        try:
            yield
        finally:
            if own is None:
                del module.configure_optimizers
            else:
                module.configure_optimizers = own
