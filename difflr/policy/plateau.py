"""Plateaus: when a stage whose length is a maximum ends, and what its schedule does then.

A stage with ``patience`` (`difflr.policy.stages.Stage`) watches one value per epoch. The rule
is Lightning's ``EarlyStopping``: an epoch *improves* when its value is better than the best so
far by more than ``min_delta``; after ``patience`` epochs in a row without improvement, the
plateau is detected. The stage then *jumps to its annealing phase*: its next ``anneal_epochs``
epochs (fewer if the stage's maximum comes first) follow the stage's own schedule from
``pct_from = max(pct_now, pct_start)`` to 1, and the stage ends. Everything here is pure
(no torch, no Lightning): `PlateauWatch` decides at each epoch's end, `Anneal` remaps the
schedule's ``pct``, and `stage_length` says how long a stage runs for a given plateau epoch (what
previews draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from difflr.utils.checks import check_choice, check_int, check_number

__all__ = [
    "Anneal",
    "EpochVerdict",
    "Mode",
    "PlateauWatch",
    "check_plateau_args",
    "check_unwatched",
    "default_mode",
    "scheduled_pct",
    "stage_length",
]

#: ``"min"``: lower is better (losses); ``"max"``: higher is better (accuracy).
Mode: TypeAlias = Literal["min", "max"]


def default_mode(monitor: str) -> Mode:
    """fastai's rule for a tracker's direction: ``"min"`` for a name holding ``loss`` or
    ``error``, else ``"max"`` (an accuracy, a score)."""
    name = monitor.lower()
    return "min" if "loss" in name or "error" in name else "max"


def check_plateau_args(
    patience: Any, monitor: Any, mode: Any, min_delta: Any, anneal_epochs: Any
) -> tuple[int | None, float, int]:
    """Validate a plateau rule's arguments; returns ``(patience, min_delta, anneal_epochs)`` in
    their normal form.

    Raises:
        TypeError, ValueError: An argument has the wrong type or is out of range (``patience <
            1``, ``mode`` not ``"min"``/``"max"``/``None``, ``min_delta < 0``,
            ``anneal_epochs < 0``).
    """
    if patience is not None:
        patience = check_int(patience, "patience", 1, what="epochs without improvement")
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(
            f"monitor must be the name of a value the recorder shows ('valid_loss', "
            f"'train_loss' or a metric's name), got {monitor!r}."
        )
    if mode is not None:
        check_choice(mode, "mode", ("min", "max"))
    min_delta = check_number(
        min_delta,
        "min_delta",
        0,
        open_low=False,
        what="the smallest change that counts as an improvement",
    )
    anneal_epochs = check_int(
        anneal_epochs, "anneal_epochs", 0, what="epochs of annealing after a plateau; 0 ends it"
    )
    return patience, min_delta, anneal_epochs


def check_unwatched(
    monitor: str, mode: Mode, min_delta: float, anneal_epochs: int, label: str = "a stage"
) -> None:
    """Refuse a plateau's arguments on a stage of a plan that watches nothing (no ``patience``,
    no ``restore_best``, also not from the plan): they would be ignored, a typo in ``monitor``
    unnoticed. Checked on the plan, not on the `Stage` (``fit_stages(plan, restore_best=True)``
    makes every stage watch).

    Raises:
        ValueError: Any of them differs from its default; the message names them and the stage.
    """
    given = [
        f"{name}={value!r}"
        for name, value, default in (
            ("monitor", monitor, "valid_loss"),
            ("mode", mode, default_mode(monitor)),
            ("min_delta", min_delta, 0.0),
            ("anneal_epochs", anneal_epochs, 1),
        )
        if value != default
    ]
    if given:
        raise ValueError(
            f"{label}: {', '.join(given)} only matter(s) to a stage that watches its monitor: "
            "give it patience=N (to end at a plateau) or restore_best=True, or drop them."
        )


@dataclass(frozen=True)
class Anneal:
    """The annealing tail of a stage: from optimizer step ``start_step`` on, the schedule runs
    from ``pct_from`` to 1 over ``steps`` steps (step ``start_step + j`` uses
    ``pct_from + (1 - pct_from) * j / steps``)."""

    start_step: int
    steps: int
    pct_from: float

    @classmethod
    def at(cls, step: int, total_steps: int, steps: int, pct_start: float) -> Anneal:
        """The tail that starts at ``step`` of a schedule of ``total_steps``, lasting ``steps``:
        past the warm-up it continues from where the schedule is; inside it, from its peak.

        Examples:
            >>> Anneal.at(step=40, total_steps=100, steps=20, pct_start=0.25)
            Anneal(start_step=40, steps=20, pct_from=0.4)
            >>> Anneal.at(step=10, total_steps=100, steps=20, pct_start=0.25).pct_from
            0.25
        """
        return cls(int(step), max(1, int(steps)), max(min(step / total_steps, 1.0), pct_start))

    def to_list(self) -> list[float]:
        return [self.start_step, self.steps, self.pct_from]

    @classmethod
    def from_list(cls, values: Any) -> Anneal | None:
        return None if values is None else cls(int(values[0]), int(values[1]), float(values[2]))


def scheduled_pct(step: int, total_steps: int, anneal: Anneal | None = None) -> float:
    """The ``pct`` of optimizer step ``step`` (0-based) of a schedule of ``total_steps`` steps:
    ``step / total_steps``, or, from the start of ``anneal`` on, its remapped position; capped
    at 1 (steps past the end keep the final value).

    Examples:
        >>> scheduled_pct(5, 10)
        0.5
        >>> scheduled_pct(5, 10, Anneal(start_step=4, steps=2, pct_from=0.6))
        0.8
    """
    if anneal is None or step < anneal.start_step:
        return min(step / total_steps, 1.0)
    done = (step - anneal.start_step) / anneal.steps
    return min(anneal.pct_from + (1 - anneal.pct_from) * done, 1.0)


def stage_length(epochs: int, plateau_epoch: int | None, anneal_epochs: int) -> int:
    """Epochs a stage of at most ``epochs`` runs when its plateau is detected at the end of its
    epoch ``plateau_epoch`` (0-based; ``None``: never): that epoch, then ``anneal_epochs`` more,
    capped by the maximum.

    Examples:
        >>> [stage_length(10, e, 2) for e in (3, 8, None)], stage_length(10, 3, 0)
        ([6, 10, 10], 4)
    """
    if plateau_epoch is None:
        return epochs
    return min(plateau_epoch + 1 + anneal_epochs, epochs)


@dataclass(frozen=True)
class EpochVerdict:
    """What `PlateauWatch.end_of_epoch` decided at an epoch's end.

    Attributes:
        improved: The epoch is the best so far (its weights are the ones to keep).
        anneal_epochs: The plateau was detected now: the tail lasts this many epochs (0: the
            stage ends now); ``None`` otherwise.
        stage_ends: The stage ends with this epoch (tail done, plateau with no tail, maximum).
    """

    improved: bool
    anneal_epochs: int | None
    stage_ends: bool


class PlateauWatch:
    """Lightning's early-stopping rule, for one stage, with the annealing tail after it.

    Args:
        epochs: The stage's maximum number of epochs.
        patience: Epochs without improvement that make a plateau; ``None`` never detects one
            (the best epoch is still tracked, for ``restore_best``).
        mode: ``"min"`` or ``"max"``.
        min_delta: An improvement must beat the best by more than this (>= 0).
        anneal_epochs: Epochs of annealing after the plateau (0: the stage ends at it).

    Attributes:
        best: The best value so far (``inf``/``-inf`` before the first epoch).
        best_epoch: The stage's epoch (0-based) that gave it; -1 before the first.
        wait: Epochs since the last improvement.
        plateau_epoch: The epoch at whose end the plateau was detected, or ``None``.
        end_epoch: The last epoch the stage runs (``epochs - 1`` until a plateau).

    Examples:
        >>> watch = PlateauWatch(epochs=10, patience=2, anneal_epochs=1)
        >>> [watch.end_of_epoch(e, v).stage_ends for e, v in enumerate([3.0, 2.0, 2.5, 2.1, 9.0])]
        [False, False, False, False, True]
        >>> watch.best, watch.best_epoch, watch.plateau_epoch, watch.end_epoch
        (2.0, 1, 3, 4)
    """

    def __init__(
        self,
        epochs: int,
        patience: int | None = None,
        mode: Mode = "min",
        min_delta: float = 0.0,
        anneal_epochs: int = 1,
    ) -> None:
        self.epochs = check_int(epochs, "epochs", 1)
        self.patience, self.min_delta, self.anneal_epochs = check_plateau_args(
            patience, "value", mode, min_delta, anneal_epochs
        )
        self.mode = mode
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = -1
        self.wait = 0
        self.plateau_epoch: int | None = None
        self.end_epoch = self.epochs - 1

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best by more than ``min_delta`` (NaN never does)."""
        if self.mode == "min":
            return value + self.min_delta < self.best
        return value - self.min_delta > self.best

    def end_of_epoch(self, epoch: int, value: float) -> EpochVerdict:
        """Take the value of the stage's epoch ``epoch`` (0-based) and decide."""
        improved = self.improves(float(value))
        if improved:
            self.best, self.best_epoch, self.wait = float(value), int(epoch), 0
        else:
            self.wait += 1
        anneal = None
        if (
            self.plateau_epoch is None
            and self.patience is not None
            and self.wait >= self.patience
            and epoch < self.epochs - 1
        ):
            self.plateau_epoch = int(epoch)
            self.end_epoch = stage_length(self.epochs, epoch, self.anneal_epochs) - 1
            anneal = self.end_epoch - epoch
        return EpochVerdict(improved, anneal, epoch >= self.end_epoch)

    _STATE = ("best", "best_epoch", "wait", "plateau_epoch", "end_epoch")

    def state_dict(self) -> dict[str, Any]:
        """Plain values: what a checkpoint keeps so a resumed stage decides as this one would."""
        return {key: getattr(self, key) for key in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self._STATE:
            setattr(self, key, state[key])
