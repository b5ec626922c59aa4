"""`StagePlateau`: a stage that ends when its monitored value stops improving, and keeps its best
weights.

The decision is `difflr.policy.plateau.PlateauWatch`'s (Lightning's early-stopping rule, pure);
this callback feeds it the value the recorder shows at each epoch's end, starts the annealing
tail in the stage's own `difflr.callbacks.scheduler.ParamScheduler` (a remap of ``pct``, not a
second scheduler), keeps a copy of the best epoch's weights, and ends the stage. It runs in each
plateau stage's Trainer of ``Learner.fit_stages``, and inside `GradualUnfreezing`, which calls
`StagePlateau.end_of_epoch` itself."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from difflr.callbacks.recorder import Recorder
from difflr.callbacks.scheduler import ParamScheduler
from difflr.policy.plateau import PlateauWatch, check_unwatched
from difflr.policy.schedules import steps_per_epoch
from difflr.policy.stages import Stage

__all__ = ["StagePlateau", "check_monitors", "check_watch_args", "epoch_values"]


def check_monitors(
    stages: Sequence[Stage], available: Sequence[str] | None, sharded: bool = False
) -> None:
    """Refuse, before training, a watching stage whose ``monitor`` is not among ``available``
    (``None``: unknown until the first epoch ends; then `StagePlateau` checks), a stage that
    watches nothing but sets ``monitor``, ``mode``, ``min_delta`` or ``anneal_epochs``
    (`difflr.policy.plateau.check_unwatched`), and ``restore_best`` on a ``sharded`` model.

    Raises:
        ValueError: The name, the stage and the available values are named.
    """
    check_watch_args(stages)
    if sharded and any(stage.restore_best for stage in stages):
        raise ValueError(
            "restore_best is not supported under ModelParallelStrategy (the copy of the best "
            "weights would be of this rank's shards); drop restore_best, or keep the best "
            "checkpoint with Learner(monitor=...) and load it after the fit."
        )
    if available is None:
        return
    for k, stage in enumerate(stages):
        if stage.watches and stage.monitor not in available:
            label = stage.name or f"stages[{k}]"
            hint = (
                " valid_loss and the metrics need validation data: pass data=(train_dl, valid_dl), "
                "or watch monitor='train_loss'."
                if "valid_loss" not in available
                else ""
            )
            raise ValueError(
                f"{label} monitors {stage.monitor!r}, which no epoch provides; the values are "
                f"{list(available)}.{hint}"
            )


def check_watch_args(stages: Sequence[Stage]) -> None:
    """`difflr.policy.plateau.check_unwatched` for each stage of a plan that watches nothing.

    Raises:
        ValueError: A plateau argument on such a stage; the stage is named.
    """
    for k, stage in enumerate(stages):
        if not stage.watches:
            label = stage.name or f"stages[{k}]"
            check_unwatched(stage.monitor, stage.mode, stage.min_delta, stage.anneal_epochs, label)


def epoch_values(trainer: pl.Trainer) -> dict[str, float]:
    """The values of the epoch ending now, as the recorder shows them (its smoothed
    ``train_loss``) when the Trainer has one, and everything the epoch logged."""
    values = {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if isinstance(value, (torch.Tensor, float, int))
        and (not isinstance(value, torch.Tensor) or value.numel() == 1)
    }
    recorder = next((cb for cb in trainer.callbacks if isinstance(cb, Recorder)), None)
    if recorder is not None:
        values.update(recorder.epoch_row(trainer))
        values.pop("epoch")
    return values


class StagePlateau(Callback):
    """Watch one `Stage` (its ``patience``, ``monitor``, ``restore_best``): at each epoch's end,
    decide, start the annealing tail, keep the best weights, end the stage.

    Args:
        stage: The stage (``stage.watches`` is true).
        scheduler: The stage's scheduler, whose ``pct`` the tail remaps.
        stop: Stop the Trainer when the stage ends (a stage of ``Learner.fit_stages``, one
            Trainer each); `GradualUnfreezing` moves on to the next stage instead.

    The best weights (every parameter and buffer of the module) are copied to the CPU at each
    improvement and loaded back at the stage's end, before its last checkpoint is written; the
    optimizer state is kept as it is. With ``restore_best`` the copy is saved in the callback's
    checkpoint state (the file then holds the model twice), so a resumed stage restores the
    same weights.
    """

    def __init__(self, stage: Stage, scheduler: ParamScheduler, stop: bool = True) -> None:
        self.stage = stage
        self.scheduler = scheduler
        self.stop = stop
        self.watch = PlateauWatch(
            stage.epochs, stage.patience, stage.mode, stage.min_delta, stage.anneal_epochs
        )
        self.best_state: dict[str, torch.Tensor] | None = None
        self.ended = False
        self._steps_per_epoch = 1

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start(trainer)
        if self.ended and self.stop:  # resumed from the checkpoint of the stage's last epoch
            trainer.should_stop = True

    def start(self, trainer: pl.Trainer) -> None:
        """Learn the epoch's number of optimizer steps (the tail's length is counted in them)."""
        self._steps_per_epoch = steps_per_epoch(
            trainer.num_training_batches, trainer.accumulate_grad_batches
        )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before the epoch's checkpoint (Lightning runs checkpoint callbacks last), so the file
        # holds the decision, the tail and the restored weights.
        self.end_of_epoch(trainer, pl_module, trainer.current_epoch)

    def end_of_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> bool:
        """Take the stage's epoch ``epoch`` (0-based) and act; returns whether the stage ends.

        Raises:
            ValueError: The epoch provides no value named ``monitor`` (the available ones are
                named).
        """
        if self.ended:
            return True
        values = epoch_values(trainer)
        monitor = self.stage.monitor
        if monitor not in values:
            raise ValueError(
                f"{self.stage.name or 'a stage'} monitors {monitor!r}, but epoch {epoch} of it "
                f"provides no such value; the values are {sorted(values)}. Pass one of them as "
                "Stage(monitor=...), or log it in validation_step."
            )
        # Every rank decides alike (a rank's own smoothed train_loss differs under DDP).
        value = float(trainer.strategy.broadcast(values[monitor], src=0))
        verdict = self.watch.end_of_epoch(epoch, value if math.isfinite(value) else math.nan)
        if verdict.improved and self.stage.restore_best:
            self.best_state = {
                key: tensor.detach().to("cpu", copy=True)
                for key, tensor in pl_module.state_dict().items()
            }
        if verdict.anneal_epochs:
            self.scheduler.anneal(
                trainer.optimizers[0],
                verdict.anneal_epochs * self._steps_per_epoch,
                self.stage.pct_start,
            )
        if verdict.stage_ends:
            self.ended = True
            if self.best_state is not None:
                pl_module.load_state_dict(self.best_state)
            if self.stop:
                trainer.should_stop = True
        return verdict.stage_ends

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"watch": self.watch.state_dict(), "ended": self.ended}
        if self.stage.restore_best:
            state["best_state"] = self.best_state
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.watch.load_state_dict(state_dict["watch"])
        self.ended = bool(state_dict["ended"])
        self.best_state = state_dict.get("best_state")
