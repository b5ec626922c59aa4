"""Running Lightning Trainers for a Learner: one place builds them and runs them.

Every fit, every stage of a plan and every ``lr_find`` gets a fresh ``Trainer`` (so that freezing
is in place before a DDP wrapper sees the model), built by `Runner.trainer` from the Learner's
arguments (what every Trainer has in common is `difflr.training.trainers`'s) and run by
`Runner.fit`: with the Learner's optimizer, quiet logs, a clean ``KeyboardInterrupt`` on Ctrl-C,
and one TensorBoard timeline across calls. ``lr_find`` uses the same two methods, and the
after-fit analysis (`difflr.predictions`) `Runner.validate` and `Runner.predict`; they are the
Learner's public seam to Lightning (``learn.runner``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from difflr.callbacks.guards import EmptyEpochGuard, FiniteLossGuard, FrozenNormEval
from difflr.callbacks.progress import LiveProgress, ProgressTable
from difflr.callbacks.recorder import Recorder
from difflr.callbacks.scheduler import ParamScheduler
from difflr.policy.schedules import steps_per_epoch
from difflr.training.checkpoints import (
    FitRecord,
    FitState,
    FolderClaim,
    LearnerCheckpoint,
    Resume,
    check_resume,
    checkpoint_callbacks,
    read_fit_state,
    resolve_checkpoint,
)
from difflr.training.data import Data, loader_length
from difflr.training.distributed import SyncBuffers, batches_per_process, planned_world_size
from difflr.training.handback import hand_back, runs_in_workers, worker_errors
from difflr.training.loggers import ContinuousLogger
from difflr.training.module import LearnerModule, training_with
from difflr.training.sharding import Sharding, fresh_strategy, rank_zero_decides
from difflr.training.signals import StopPredictingOnSigterm, interruptible
from difflr.training.trainers import (
    check_trainer_kwargs,
    check_user_checkpoints,
    make_trainer,
    quiet_lightning,
    trainer_arguments,
    wants_live_progress,
)
from difflr.utils.checks import check_choice, is_int, user_stacklevel

__all__ = ["Runner"]


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
        checkpoint: Write ``path/checkpoints/last.ckpt`` at each epoch end; ``None``: yes,
            unless ``enable_checkpointing=False`` is among ``trainer_kwargs``.
        monitor: Also keep ``path/checkpoints/best.ckpt`` by this logged metric.
        check_finite: ``True`` stops at a non-finite training loss, ``"grads"`` at non-finite
            gradients too, ``False`` checks nothing (see `FiniteLossGuard`).
        trainer_kwargs: Passed to every Trainer; they mean what they mean in Lightning.
        owner: The Learner's id, which claims the checkpoint folder during a fit.
        train_bn: ``False`` keeps the norm layers of frozen groups in eval mode while training.
        sharding: Shards the model under ``ModelParallelStrategy`` (`difflr.training.sharding`).

    Raises:
        TypeError: ``trainer_kwargs`` sets the length of training, the callbacks or the logger
            (the Learner's own arguments do that).
        ValueError: ``checkpoint=True`` together with ``enable_checkpointing=False``; a strategy
            the Learner cannot drive (`difflr.training.sharding.check_strategy`).
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
        checkpoint: bool | None = None,
        monitor: str | None = None,
        check_finite: bool | str = True,
        trainer_kwargs: Mapping[str, Any] | None = None,
        owner: str = "",
        train_bn: bool = True,
        sharding: Sharding | None = None,
    ) -> None:
        trainer_kwargs = check_trainer_kwargs(trainer_kwargs, checkpoint)
        switch = trainer_kwargs.get("enable_checkpointing")
        check_choice(check_finite, "check_finite", (True, False, "grads"))
        self.module = module
        self.optimizer = optimizer
        self.data = data
        self.path = Path(path)
        self.logger = logger
        self.recorder = recorder
        self.table = ProgressTable(recorder)
        self.callbacks = list(callbacks)
        # Lightning's switch means what it means: enable_checkpointing=False writes no file.
        self.checkpoint = switch is not False if checkpoint is None else bool(checkpoint)
        if monitor is not None and not self.checkpoint:
            raise ValueError(
                f"monitor={monitor!r} keeps path/checkpoints/best.ckpt, but checkpointing is off "
                "(checkpoint=False or enable_checkpointing=False); turn it on, or drop monitor."
            )
        self.monitor = monitor
        self.check_finite = check_finite
        self.trainer_kwargs = trainer_kwargs
        self.owner = owner
        self.train_bn = train_bn
        self.sharding = sharding
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
        kwargs = trainer_arguments(
            self.trainer_kwargs,
            overrides,
            path=self.path,
            logger=self.logger,
            train_dl=self.data.train_dl,
        )
        extra: list[pl.Callback] = [self.recorder]
        if not self.train_bn:
            extra.append(FrozenNormEval())
        live = None
        if wants_live_progress(kwargs, [*callbacks, *(self.callbacks if standard else ())]):
            # Lightning takes it instead of its own bar; it shows the table's rows too.
            kwargs["enable_progress_bar"] = True
            live = LiveProgress(self.table if standard else None, label=progress_label)
            extra.append(live)  # after the recorder: it shows the row the recorder just made
        if standard:
            check_user_checkpoints(self.callbacks, self.path, has_logger=self.logger is not None)
            extra += [*([self.table] if live is None else []), *self.callbacks]
            extra.append(EmptyEpochGuard())
            if self.check_finite:
                extra.append(FiniteLossGuard(check_grads=self.check_finite == "grads"))
            if self.checkpoint:
                extra += checkpoint_callbacks(self.path / "checkpoints", self.monitor)
            if any(isinstance(cb, ModelCheckpoint) for cb in extra):
                # Lightning refuses checkpoint callbacks with enable_checkpointing=False.
                kwargs["enable_checkpointing"] = True
        # SyncBuffers: every DDP rank ends the fit with rank 0's BatchNorm statistics.
        trainer = make_trainer(
            kwargs, [SyncBuffers(), StopPredictingOnSigterm(), *callbacks, *extra]
        )
        # ddp_notebook/ddp_fork: the workers hand back everything the Learner keeps.
        hand_back(trainer, self.module, self.optimizer)
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
        writes = any(isinstance(cb, LearnerCheckpoint) for cb in trainer.callbacks)
        if writes or (log and self.logger is not None):
            self._check_path()
        # Lightning 2 keeps the module's train/eval mode; a fit trains (as fastai's does).
        self.module.train()
        claim = (
            FolderClaim(self.path / "checkpoints", self.owner)
            if writes and trainer.is_global_zero
            else contextlib.nullcontext()
        )
        where = (
            f"{self.path / 'checkpoints' / 'last.ckpt'} holds the last epoch whose training "
            "finished: resume with ckpt_path='last'"
            if writes
            else "no checkpoint was written (checkpointing is off)"
        )
        try:
            with (
                interruptible(
                    trainer,
                    self.module,
                    interrupted=lambda: (
                        "fit interrupted; its worker processes were stopped and nothing came "
                        "back from them: the Learner is as it was before this call."
                        if runs_in_workers(trainer)
                        else f"fit interrupted after {scheduler.step} optimizer steps; the "
                        "Learner keeps the weights and the recorder keeps the steps done."
                    ),
                    terminated=f"training stopped; {where}",
                ),
                quiet_lightning(),
                claim,
                self._supersede_optimizer(),
                self._sharded(trainer),
                warnings.catch_warnings(),
                worker_errors(trainer),
            ):
                # LearnerModule always defines validation_step; no valid_dl is not a mistake.
                warnings.filterwarnings(
                    "ignore", ".*`validation_step` but have no `val_dataloader`"
                )
                # Every fit writes path/checkpoints/last.ckpt anew, by design.
                warnings.filterwarnings(
                    "ignore", r"Checkpoint directory .* exists and is not empty"
                )
                trainer.fit(
                    self.module,
                    **self.data.fit_kwargs(),
                    ckpt_path=None if ckpt_path is None else str(ckpt_path),
                )
        finally:
            if log and self.logger is not None:
                self.logger.step_offset += scheduler.step
                self.logger.epoch_offset += trainer.current_epoch

    def resume_point(
        self,
        ckpt_path: str | Path | None,
        plan: Mapping[str, Any],
        learner: str,
        last_run: str | None,
    ) -> Resume | None:
        """Where a fit of ``plan`` resumes from ``ckpt_path`` (``"last"``: ``path/checkpoints/
        last.ckpt``), checked by `difflr.training.checkpoints.check_resume`; ``None`` without one.

        Raises:
            FileNotFoundError, UnreadableFileError, ValueError: No such checkpoint, an unreadable
                one, or one that does not belong to this fit (the difference is named).
        """
        if ckpt_path is None:
            return None

        def decide() -> Resume:
            path = resolve_checkpoint(self.path / "checkpoints", ckpt_path)
            saved = read_fit_state(path)
            stage, frozen = check_resume(saved, plan, learner=learner, last_run=last_run, path=path)
            return Resume(
                path, stage, frozen, saved.run, list(saved.offsets), dict(saved.found_lrs)
            )

        # Rank 0 wrote the checkpoint, with its own Learner's and fit's ids: it decides for all.
        return rank_zero_decides(decide)

    def fit_stage(
        self,
        stage: Any,
        scheduler: ParamScheduler,
        record: FitRecord,
        frozen: Sequence[bool],
        resume: Resume | None = None,
        callbacks: Sequence[pl.Callback] = (),
    ) -> pl.Trainer:
        """Train one `difflr.policy.stages.Stage` in a fresh Trainer (resuming it from ``resume``),
        its checkpoints holding ``record`` with this stage's frozen pattern and timeline offsets
        (see `difflr.training.checkpoints.FitState`), with the stage's own ``callbacks`` (its
        `difflr.callbacks.plateau.StagePlateau`); returns the Trainer."""
        if not any(p.requires_grad for p in self.module.parameters()):
            raise ValueError(
                "nothing would train: every parameter is frozen (every layer group frozen, and "
                "with train_bn=False the normalisation layers too). Call unfreeze() or "
                "freeze_to(n) with n < the number of groups, or give the stage a freeze_to."
            )
        if resume is not None:
            self.set_offsets(resume.offsets)  # continue the interrupted timeline
        state = FitState(
            dataclasses.replace(record, frozen=tuple(frozen), offsets=tuple(self.offsets())),
            loaders=(self.data.train_dl, self.data.valid_dl),
        )
        trainer = self.trainer([scheduler, state, *callbacks], max_epochs=stage.epochs)
        self.fit(trainer, scheduler, ckpt_path=None if resume is None else resume.path)
        return trainer

    def describe_fit(
        self,
        stages: Sequence[Any],
        default_lr: Any,
        default_moms: Sequence[float],
        groups: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """What defines a fit of ``stages`` (`difflr.policy.stages.Stage`s) run by this Runner, as its
        checkpoints record it: every stage with its defaults resolved, the gradient accumulation,
        the optimizer steps per epoch (``None`` when the data has no length), the layer groups
        (`difflr.groups.layers.group_fingerprint`) and the optimizer (its class and the size of
        each param group: ``wd_bn_bias`` and ``opt_func`` change them, and a resume would load
        the optimizer state into the wrong shape)."""
        try:
            steps = self.steps_per_epoch()
        except ValueError:
            steps = None
        return {
            "stages": [stage.describe(len(groups), default_lr, default_moms) for stage in stages],
            "accumulate_grad_batches": self.trainer_kwargs.get("accumulate_grad_batches", 1),
            "steps_per_epoch": steps,
            "groups": groups,
            "optimizer": {
                "type": type(self.optimizer).__name__,
                "param_groups": [
                    [g.get("name"), len(g["params"])] for g in self.optimizer.param_groups
                ],
            },
        }

    def check_schedulable(self) -> None:
        """Refuse, before anything changes, a training loader whose epoch has no known length:
        a schedule needs the number of steps it runs over.

        Raises:
            ValueError: The loader has no ``len`` and ``limit_train_batches`` is not an int.
        """
        limit = self.trainer_kwargs.get("limit_train_batches")
        loader = self.data.train_dl
        if loader is None or loader_length(loader) is not None:
            return
        if is_int(limit) and limit > 0:
            return
        raise ValueError(
            "the training loader has no length (an IterableDataset), so a schedule cannot know "
            "how many steps an epoch has: give the dataset a __len__, or pass "
            "limit_train_batches=<batches per epoch> (an int) to the Learner."
        )

    def _check_path(self) -> None:
        """Refuse a ``path`` that cannot hold logs and checkpoints before training, not after
        the first epoch has trained."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as error:
            raise OSError(
                error.errno,
                f"path={str(self.path)!r} cannot hold the Learner's logs and checkpoints "
                f"({error.strerror or error}); pass a writable folder as path=, or logger=False "
                "and checkpoint=False to write nothing.",
            ) from error

    def offsets(self) -> list[int]:
        """The logger's step and epoch offsets (where the next fit starts on the timeline)."""
        if self.logger is None:
            return [0, 0]
        return [self.logger.step_offset, self.logger.epoch_offset]

    def set_offsets(self, offsets: Sequence[int]) -> None:
        """Move the timeline back to where a resumed fit started, so it continues its own."""
        if self.logger is not None:
            self.logger.step_offset, self.logger.epoch_offset = (int(v) for v in offsets)

    def validate(self, trainer: pl.Trainer, **data: Any) -> list[dict[str, float]]:
        """``trainer.validate`` of the module, with quiet logs and a clean interrupt; nothing is
        printed (the values come back).

        Args:
            trainer: From `trainer`.
            **data: ``dataloaders=`` or ``datamodule=`` (none: the module's own loader).

        Returns:
            One dict per loader of the values the module logged (Lightning's return value).

        Raises:
            KeyboardInterrupt: Ctrl-C.
            ValueError: The loader yielded no batch.
        """
        with self._evaluating(trainer, "validate"):
            results = trainer.validate(self.module, verbose=False, **data)
        # Worker processes (ddp_notebook) count their batches in their own loop: their values
        # came back.
        read = trainer.validate_loop.batch_progress.total.completed or (
            runs_in_workers(trainer) and any(results)
        )
        if not read:
            raise ValueError(
                "validate read no batch: the validation loader is empty (an empty "
                "IterableDataset, or limit_val_batches=0?); pass a loader with data."
            )
        return results

    def predict(self, trainer: pl.Trainer, **data: Any) -> None:
        """``trainer.predict`` of the module, with quiet logs and a clean interrupt. Lightning
        keeps no outputs: a callback of ``trainer`` collects what it needs (see
        `difflr.predictions`).

        Raises:
            KeyboardInterrupt: Ctrl-C.
        """
        with self._evaluating(trainer, "predict"):
            trainer.predict(self.module, return_predictions=False, **data)

    @contextmanager
    def _evaluating(self, trainer: pl.Trainer, what: str) -> Iterator[None]:
        with (
            interruptible(
                trainer,
                self.module,
                interrupted=lambda: f"{what} interrupted; the model is unchanged.",
                terminated=f"{what} stopped; the model is unchanged",
                restore_modes=True,
            ),
            worker_errors(trainer),
            self._sharded(trainer),
            quiet_lightning(),
        ):
            yield

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
            strategy = {"strategy": fresh_strategy(self.trainer_kwargs.get("strategy", "auto"))}
            world_size = planned_world_size({**self.trainer_kwargs, **strategy})
        n = batches_per_process(
            loader, world_size, self.trainer_kwargs.get("use_distributed_sampler", True)
        )
        limit = self.trainer_kwargs.get("limit_train_batches")
        if is_int(limit):
            n = min(n, limit)
        elif isinstance(limit, float):
            n = int(n * limit)
        return steps_per_epoch(n, self.trainer_kwargs.get("accumulate_grad_batches", 1))

    def _sharded(self, trainer: pl.Trainer) -> Any:
        """Under ``ModelParallelStrategy``: the module's ``configure_model`` for this run shards the
        model (or runs the module's own) and re-targets the optimizer (`Sharding.configuring`)."""
        if self.sharding is None:
            return contextlib.nullcontext()
        return self.sharding.configuring(self.module, self.optimizer, trainer.strategy)

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
                stacklevel=user_stacklevel(),
            )
            self._notified_optimizer = True
        with training_with(self.module, self.optimizer):
            yield
