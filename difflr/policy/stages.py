"""Stages: the one description of a training segment, and plans made of them.

A `Stage` says everything one Trainer's worth of training needs: which layer groups are frozen,
how many epochs, which schedule (one-cycle, flat-cosine or constant) with its hyper-parameters,
and the weight decay. It is validated when it is made (and against the model before anything
trains), gives the schedules its `ParamScheduler` follows, and counts its own optimizer steps. Every fit method of
the Learner is a short function that builds a list of stages (a *plan*): ``fit_one_cycle`` is one
stage, ``fine_tune`` two, ``fit_stages`` any number. The same plan is run by
``Learner.fit_stages`` (a fresh Trainer per stage, so a DDP wrapper sees exactly the params that
train), previewed without training by `preview_plan`, and run inside a user's own ``Trainer`` by
`GradualUnfreezing`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np

from difflr.policy.freeze import check_freeze_to
from difflr.policy.lr import LRSpec, expand_lrs
from difflr.policy.plateau import Mode, check_plateau_args, default_mode
from difflr.policy.schedules import (
    DEFAULT_MOMS,
    Schedule,
    flat_cos_lr,
    one_cycle_lr,
    one_cycle_mom,
    sched_const,
)
from difflr.policy.suggestions import (
    SuggestionFunc,
    minimum,
    slide,
    steep,
    suggestion_name,
    valley,
)
from difflr.utils.checks import (
    check_choice,
    check_int,
    check_moms,
    check_number,
    check_pct,
    check_positive,
    check_wd,
    is_int,
)

__all__ = ["LR_FIND_KEYS", "SUGGESTIONS", "ScheduleKind", "Stage", "check_plan", "fine_tune_stages"]

#: The suggestion functions a stage names in ``lr_max="valley"`` (any such function may also be
#: passed itself).
SUGGESTIONS: dict[str, SuggestionFunc] = {
    "valley": valley,
    "minimum": minimum,
    "steep": steep,
    "slide": slide,
}

#: What ``Stage(lr_find_kwargs=...)`` may set of the stage's range test.
LR_FIND_KEYS = ("start_lr", "end_lr", "num_it", "stop_div", "snapshot")

#: The schedules a stage can follow: fastai's one-cycle (LR and momentum), flat-then-cosine LR,
#: or a constant LR (the last two leave momentum as it is). Each has its row in `_KINDS`.
ScheduleKind: TypeAlias = Literal["one_cycle", "flat_cos", "constant"]


@dataclass(frozen=True)
class _Kind:
    """What a kind of schedule makes of a stage: adding a kind is adding one of these to
    `_KINDS` (and its name to `ScheduleKind`)."""

    #: ``pct_start`` when the stage gives none.
    pct_start: float
    #: ``(peak LRs, stage) -> (pct -> LRs)``.
    lr: Callable[[np.ndarray, Stage], Schedule]
    #: ``(moms, stage) -> (pct -> momentum)``; ``None`` leaves momentum as it is.
    mom: Callable[[Sequence[float], Stage], Schedule] | None
    #: The stage's fields that shape the curve (the others are not recorded).
    knobs: frozenset[str]
    #: What messages call the peak LR.
    lr_name: str = "lr"


_KINDS: dict[str, _Kind] = {
    "one_cycle": _Kind(
        pct_start=0.25,
        lr=lambda lrs, s: one_cycle_lr(lrs, s.pct_start, s.div, s.div_final),
        mom=lambda moms, s: one_cycle_mom(moms, s.pct_start),
        knobs=frozenset({"pct_start", "div", "div_final"}),
        lr_name="lr_max",
    ),
    "flat_cos": _Kind(
        pct_start=0.75,
        lr=lambda lrs, s: flat_cos_lr(lrs, s.pct_start, s.div_final),
        mom=None,
        knobs=frozenset({"pct_start", "div_final"}),
    ),
    "constant": _Kind(
        pct_start=0.25, lr=lambda lrs, s: sched_const(lrs), mom=None, knobs=frozenset()
    ),
}


_MILESTONE_KEYS = {"freeze_to", "duration", "lrs"}


_MILESTONE_OPTIONAL = {
    "pct_start",
    "div_factor",
    "final_div_factor",
    "base_momentum",
    "max_momentum",
}


@dataclass(frozen=True)
class Stage:
    """One training segment: a frozen pattern, a number of epochs and one LR schedule.

    Args:
        freeze_to: Groups ``[:freeze_to]`` are frozen (negative counts from the end; 0 trains
            all); ``None`` keeps the pattern in place when the stage starts.
        epochs: Number of epochs (>= 1).
        lr_max: Peak LR spec (the LR of ``"flat_cos"`` and ``"constant"``): a float, a ``slice``
            or one value per group; ``None`` uses the Learner's ``lr``. Zeros are allowed in a
            list (the original milestone plans give frozen groups 0): such groups do not move.
            Or an LR found at the stage's start: a suggestion function's name (``"valley"``,
            ``"minimum"``, ``"steep"``, ``"slide"``) or such a function ``(lrs, losses) -> lr``.
            ``Learner.fit_stages`` then runs the LR range test (``Learner.lr_find``) once the
            stage's frozen pattern is in place, and the suggestion ``s`` (the head group's LR)
            becomes the peak LR (see ``lr_mult``).
        pct_start: Fraction of the steps before the LR starts to fall, in (0, 1): the warm-up
            of a one-cycle (default 0.25), the flat part of a flat-cosine (default 0.75).
        div: A one-cycle starts at ``lr_max / div``.
        div_final: The LR ends at ``lr_max / div_final`` (one-cycle and flat-cosine).
        moms: One-cycle momentum ``(start, middle, end)``; ``None`` uses the Learner's.
        wd: Weight decay for this stage and later ones; ``None`` keeps the current one.
        schedule: ``"one_cycle"``, ``"flat_cos"`` or ``"constant"``.
        name: A label for error messages (``from_milestones`` sets ``"milestones[3]"``).
        patience: Keyword-only. End the stage after this many epochs (>= 1) without improvement
            of ``monitor`` (a *plateau*); ``epochs`` is then the maximum. ``None``: a fixed length.
        monitor: Keyword-only. The value watched at each epoch's end, as the recorder shows it:
            ``"valid_loss"``, ``"train_loss"`` or a metric's name.
        mode: Keyword-only. ``"min"`` (lower is better) or ``"max"``; ``None``: fastai's rule,
            ``"min"`` for a name holding ``loss`` or ``error``, else ``"max"`` (``accuracy``).
        min_delta: Keyword-only. An epoch improves when it beats the best by more than this
            (>= 0), Lightning's ``EarlyStopping`` rule.
        restore_best: Keyword-only. At the stage's end, load the weights (every parameter and
            buffer) of its best epoch by ``monitor``, bit for bit, before the next stage; the
            optimizer state is kept as it is. Also for a stage without ``patience``.
        anneal_epochs: Keyword-only. After a plateau, the stage's schedule jumps to its
            annealing phase: the next ``anneal_epochs`` epochs (capped by ``epochs``) run it from
            ``max(pct_now, pct_start)`` down to its end, then the stage ends; 0 ends the stage
            at the plateau. See `difflr.policy.plateau`.
        lr_mult: With a found LR ``s``: the stage uses ``slice(s / lr_mult, s)`` (geometric from
            the stem to the head, >= 1), and the range test sweeps with the same ratios between
            groups; ``None``: every group gets ``s``. Keyword-only; only with a found LR.
        lr_find_kwargs: Arguments of the stage's range test: ``start_lr`` and ``end_lr`` (the
            head group's bounds, floats), ``num_it``, ``stop_div``, ``snapshot``; the rest are
            ``Learner.lr_find``'s defaults. Keyword-only; only with a found LR.

    Raises:
        TypeError: A field has the wrong type.
        ValueError: A field is out of range; the message names the stage when it has a name.

    Examples:
        >>> plan = [Stage(-1, 1, 1e-3), Stage(0, 2, slice(1e-5, 1e-3), pct_start=0.3)]
        >>> plan[1].lrs(3)
        [1e-05, 0.0001, 0.001]
        >>> plan[0].n_steps(steps_per_epoch=8)
        8
        >>> found = Stage(0, 2, "valley", lr_mult=100)  # LR found when the stage starts
        >>> found.with_found_lr(1e-3).lr_max
        slice(1e-05, 0.001, None)
    """

    freeze_to: int | None
    epochs: int
    lr_max: LRSpec | None = None
    pct_start: float | None = None
    div: float = 25.0
    div_final: float = 1e5
    moms: tuple[float, float, float] | None = None
    wd: float | None = None
    schedule: ScheduleKind = "one_cycle"
    name: str = field(default="", compare=False)
    patience: int | None = field(kw_only=True, default=None)
    monitor: str = field(kw_only=True, default="valid_loss")
    mode: Mode | None = field(kw_only=True, default=None)
    min_delta: float = field(kw_only=True, default=0.0)
    restore_best: bool = field(kw_only=True, default=False)
    anneal_epochs: int = field(kw_only=True, default=1)
    lr_mult: float | None = field(default=None, kw_only=True)
    lr_find_kwargs: Mapping[str, Any] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        try:
            self._check_found_lr()
            if self.freeze_to is not None and not is_int(self.freeze_to):
                raise TypeError(
                    f"freeze_to must be an int or None (keep the current pattern), got "
                    f"{self.freeze_to!r}."
                )
            # numpy integers are integers: stored as int (Lightning asserts int epochs).
            object.__setattr__(
                self, "epochs", check_int(self.epochs, "epochs", 1, what="a number of epochs")
            )
            if self.freeze_to is not None:
                object.__setattr__(self, "freeze_to", int(self.freeze_to))
            check_choice(self.schedule, "schedule", tuple(_KINDS))
            pct_start = self._kind.pct_start if self.pct_start is None else self.pct_start
            object.__setattr__(self, "pct_start", check_pct(pct_start))
            check_positive(self.div, "div")
            check_positive(self.div_final, "div_final")
            if self.moms is not None:
                object.__setattr__(self, "moms", check_moms(self.moms))
            check_wd(self.wd)
            patience, min_delta, anneal_epochs = check_plateau_args(
                self.patience, self.monitor, self.mode, self.min_delta, self.anneal_epochs
            )
            object.__setattr__(self, "patience", patience)
            object.__setattr__(self, "min_delta", min_delta)
            object.__setattr__(self, "anneal_epochs", anneal_epochs)
            if not isinstance(self.restore_best, bool):
                raise TypeError(f"restore_best must be True or False, got {self.restore_best!r}.")
            if self.mode is None:
                object.__setattr__(self, "mode", default_mode(self.monitor))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{self.name}: {exc}" if self.name else str(exc)) from None

    @property
    def watches(self) -> bool:
        """Whether the stage watches ``monitor`` (it has ``patience`` or ``restore_best``)."""
        return self.patience is not None or self.restore_best

    @property
    def _kind(self) -> _Kind:
        return _KINDS[self.schedule]

    # ------------------------------------------------------------------------------- found LRs
    @property
    def finds_lr(self) -> bool:
        """Whether the stage's peak LR is found by a range test at its start."""
        return isinstance(self.lr_max, str) or callable(self.lr_max)

    @property
    def suggestion(self) -> SuggestionFunc | None:
        """The suggestion function that picks a found LR (``None`` for a given LR)."""
        if isinstance(self.lr_max, str):
            return SUGGESTIONS[self.lr_max]
        return self.lr_max if callable(self.lr_max) else None

    def sweep_bounds(self) -> tuple[LRSpec, LRSpec]:
        """``(start_lr, end_lr)`` of the stage's range test, as ``Learner.lr_find`` takes them:
        the head group's bounds (``lr_find_kwargs``, else ``lr_find``'s 1e-7 and 10), as
        ``slice(bound / lr_mult, bound)`` with ``lr_mult``, so that the sweep keeps the ratios
        between groups the stage trains with.

        Examples:
            >>> Stage(0, 1, "valley", lr_mult=10).sweep_bounds()
            (slice(1e-08, 1e-07, None), slice(1.0, 10.0, None))
        """
        kwargs = self.lr_find_kwargs or {}
        bounds = float(kwargs.get("start_lr", 1e-7)), float(kwargs.get("end_lr", 10.0))
        if self.lr_mult is None:
            return bounds
        start, end = (slice(b / self.lr_mult, b) for b in bounds)
        return start, end

    def with_found_lr(self, lr: float) -> Stage:
        """This stage with the LR its range test found (``lr``, the head group's), as a stage
        with a given LR: ``lr_max=slice(lr / lr_mult, lr)`` (``lr`` without ``lr_mult``).

        Raises:
            ValueError: The stage has a given LR, or ``lr`` is not a finite number > 0 (a range
                test without enough finite points suggests NaN).
        """
        label = f"{self.name}: " if self.name else ""
        if not self.finds_lr:
            raise ValueError(f"{label}this stage's LR is given (lr_max={self.lr_max!r}).")
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float, np.floating))
            or not (np.isfinite(lr) and lr > 0)
        ):
            raise ValueError(
                f"{label}the range test suggested lr={lr!r}, not a finite LR > 0 (the sweep "
                "recorded too few finite points); give the stage more iterations "
                "(lr_find_kwargs={'num_it': ...}), a lower end_lr, or a given lr_max."
            )
        lr = float(lr)
        spec: LRSpec = lr if self.lr_mult is None else slice(lr / self.lr_mult, lr)
        return dataclasses.replace(self, lr_max=spec, lr_mult=None, lr_find_kwargs=None)

    def _check_found_lr(self) -> None:
        if isinstance(self.lr_max, str) and self.lr_max not in SUGGESTIONS:
            raise ValueError(
                f"lr_max={self.lr_max!r} is not a suggestion function; name one of "
                f"{sorted(SUGGESTIONS)} (or pass a function (lrs, losses) -> lr, or an LR)."
            )
        if not self.finds_lr:
            for arg in ("lr_mult", "lr_find_kwargs"):
                if getattr(self, arg) is not None:
                    raise ValueError(
                        f"{arg}={getattr(self, arg)!r} is for an LR found at the stage's start "
                        f"(lr_max='valley'), but lr_max={self.lr_max!r}"
                        + (
                            "; for discriminative LRs pass lr_max=slice(lo, hi)."
                            if arg == "lr_mult"
                            else "; drop it."
                        )
                    )
            return
        if self.lr_mult is not None:
            object.__setattr__(
                self,
                "lr_mult",
                check_number(
                    self.lr_mult,
                    "lr_mult",
                    1,
                    open_low=False,
                    what="the head's LR over the first group's",
                    example="100",
                ),
            )
        kwargs = self.lr_find_kwargs
        if kwargs is None:
            return
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"lr_find_kwargs must be a dict, got {kwargs!r}.")
        unknown = sorted(set(kwargs) - set(LR_FIND_KEYS))
        if unknown:
            raise ValueError(
                f"lr_find_kwargs has unknown key(s) {unknown}; a stage's range test takes "
                f"{list(LR_FIND_KEYS)} (its suggestion is lr_max, and it shows no plot)."
            )
        start = check_positive(kwargs.get("start_lr", 1e-7), "lr_find_kwargs['start_lr']")
        end = check_positive(kwargs.get("end_lr", 10.0), "lr_find_kwargs['end_lr']")
        if start >= end:
            raise ValueError(
                f"lr_find_kwargs: start_lr={start!r} must be below end_lr={end!r}; e.g. "
                "{'start_lr': 1e-7, 'end_lr': 10}."
            )
        check_int(kwargs.get("num_it", 100), "lr_find_kwargs['num_it']", 2, what="iterations")
        check_choice(
            kwargs.get("snapshot", "memory"), "lr_find_kwargs['snapshot']", ("memory", "disk")
        )
        check_choice(kwargs.get("stop_div", True), "lr_find_kwargs['stop_div']", (True, False))
        object.__setattr__(self, "lr_find_kwargs", dict(kwargs))

    # ------------------------------------------------------------------------------- the model
    def lrs(self, n_groups: int, default: LRSpec | None = None) -> list[float]:
        """The stage's peak LR per layer group (``default`` stands in for ``lr_max=None``)."""
        if self.finds_lr:
            raise ValueError(
                f"{self.name + ': ' if self.name else ''}this stage's LR is found when it starts "
                f"(lr_max={suggestion_name(self.suggestion)!r}); take "
                "stage.with_found_lr(lr).lrs(n_groups)."
            )
        spec = default if self.lr_max is None else self.lr_max
        if spec is None:
            raise ValueError("this stage has no lr_max; pass one, or run it through a Learner.")
        label = f"{self.name}['lrs']" if self.name else self._kind.lr_name
        lrs = expand_lrs(spec, n_groups, name=label, allow_zero=True)
        if not any(lrs):
            raise ValueError(f"{label} is all zeros: nothing would train in this stage.")
        return lrs

    def check(self, n_groups: int, default_lr: LRSpec | None = None) -> None:
        """Validate the stage against a model with ``n_groups`` layer groups.

        Raises:
            ValueError: ``freeze_to`` is out of range or the LR spec does not fit.
        """
        if self.freeze_to is not None:
            try:
                check_freeze_to(self.freeze_to, n_groups)
            except ValueError as exc:
                raise ValueError(f"{self.name}: {exc}" if self.name else str(exc)) from None
        if not self.finds_lr:  # a found LR is checked when it is found (`with_found_lr`)
            self.lrs(n_groups, default_lr)

    def describe(
        self,
        n_groups: int,
        default_lr: LRSpec | None = None,
        default_moms: Sequence[float] = DEFAULT_MOMS,
    ) -> dict[str, Any]:
        """What defines the stage, as plain values with every default resolved (LRs per group,
        momentums): what a checkpoint records, so that a resume can be checked against it."""
        knobs = self._kind.knobs
        found = {}
        if self.finds_lr:  # the LR found is recorded apart (the fit record's found_lrs)
            found = {
                "lr_find": {
                    "suggestion": suggestion_name(self.suggestion),
                    "lr_mult": self.lr_mult,
                    **(self.lr_find_kwargs or {}),
                }
            }
        described = {
            "schedule": self.schedule,
            "freeze_to": self.freeze_to,
            "epochs": self.epochs,
            "lrs": None if self.finds_lr else self.lrs(n_groups, default_lr),
            **found,
            "pct_start": self.pct_start if "pct_start" in knobs else None,
            "div": self.div if "div" in knobs else None,
            "div_final": self.div_final if "div_final" in knobs else None,
            "moms": None if self._kind.mom is None else list(self.moms or default_moms),
            "wd": self.wd,
        }
        if self.watches:  # only then: a fixed plan describes itself as it always did
            described["plateau"] = {
                "patience": self.patience,
                "monitor": self.monitor,
                "mode": self.mode,
                "min_delta": self.min_delta,
                "restore_best": self.restore_best,
                "anneal_epochs": self.anneal_epochs,
            }
        return described

    def n_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the stage at ``steps_per_epoch`` steps per epoch."""
        return self.epochs * steps_per_epoch

    # ------------------------------------------------------------------------------- schedules
    def lr_schedule(self, n_groups: int, default_lr: LRSpec | None = None) -> Schedule:
        """``pct -> one LR per layer group``."""
        return self._kind.lr(np.array(self.lrs(n_groups, default_lr)), self)

    def mom_schedule(self, default: Sequence[float]) -> Schedule | None:
        """``pct -> momentum`` for a one-cycle (``self.moms`` or ``default``); ``None`` for the
        schedules that leave momentum as it is."""
        mom = self._kind.mom
        return None if mom is None else mom(self.moms or default, self)

    # ------------------------------------------------------------------------------- plans
    @classmethod
    def from_milestones(cls, milestones: Mapping[int, Mapping[str, Any]]) -> list[Stage]:
        """Read the original example's milestone dict into a plan.

        Keys are 1-based epochs at which a milestone starts; each value has ``freeze_to``,
        ``duration`` (epochs), ``lrs`` (one peak LR per group, 0 for frozen groups) and
        optionally ``pct_start`` and torch ``OneCycleLR``'s knobs: ``div_factor`` (→ ``div``),
        ``final_div_factor`` (torch divides the *initial* LR by it, so ``div_final`` becomes
        ``div_factor * final_div_factor``), ``base_momentum`` and ``max_momentum`` (→ ``moms =
        (max, base, max)``).

        Raises:
            ValueError: An unknown or missing key, a gap or an overlap between milestones, lists
                of ``lrs`` of different lengths; the message names the milestone.

        Examples:
            >>> plan = Stage.from_milestones({
            ...     1: {"freeze_to": -1, "duration": 1, "pct_start": 0.3, "lrs": [0, 1e-3]},
            ...     2: {"freeze_to": 0, "duration": 2, "pct_start": 0.3, "lrs": [1e-5, 1e-4]},
            ... })
            >>> [(s.freeze_to, s.epochs) for s in plan]
            [(-1, 1), (0, 2)]
        """
        if not isinstance(milestones, Mapping) or not milestones:
            error = ValueError if isinstance(milestones, Mapping) else TypeError
            raise error(
                f"milestones must be a non-empty dict {{epoch: {{...}}}}, got {milestones!r}."
            )
        stages = []
        expected_epoch = 1
        n_lrs = None
        for epoch in sorted(milestones):
            label = f"milestones[{epoch!r}]"
            if not is_int(epoch):
                raise TypeError(f"{label}: keys must be int epochs (1-based), got {epoch!r}.")
            spec = milestones[epoch]
            if not isinstance(spec, Mapping):
                raise TypeError(f"{label} must be a dict, got {type(spec).__name__}.")
            unknown = set(spec) - _MILESTONE_KEYS - _MILESTONE_OPTIONAL
            if unknown:
                raise ValueError(
                    f"{label} has unknown key(s) {sorted(unknown)}; known keys are "
                    f"{sorted(_MILESTONE_KEYS | _MILESTONE_OPTIONAL)}."
                )
            missing = _MILESTONE_KEYS - set(spec)
            if missing:
                raise ValueError(f"{label} lacks key(s) {sorted(missing)}.")
            if epoch < expected_epoch:
                raise ValueError(
                    f"{label} starts at epoch {epoch}, inside the previous milestone (which runs "
                    f"until epoch {expected_epoch - 1}); milestones must not overlap."
                )
            if epoch > expected_epoch:
                raise ValueError(
                    f"{label} starts at epoch {epoch}, but the previous milestone ends at epoch "
                    f"{expected_epoch - 1}: epochs {expected_epoch}..{epoch - 1} have no milestone "
                    "(the first milestone is epoch 1)."
                )
            lrs = spec["lrs"]
            if not isinstance(lrs, (Sequence, np.ndarray)) or isinstance(lrs, str):
                raise TypeError(
                    f"{label}['lrs'] must be a list with one LR per group, got {lrs!r}."
                )
            if n_lrs is not None and len(lrs) != n_lrs:
                raise ValueError(
                    f"{label}['lrs'] has {len(lrs)} values but earlier milestones have {n_lrs}; "
                    "give one LR per layer group in every milestone."
                )
            n_lrs = len(lrs)
            div = spec.get("div_factor", 25.0)
            moms = None
            if "base_momentum" in spec or "max_momentum" in spec:
                # torch's OneCycleLR defaults (max 0.95, base 0.85) are fastai's.
                top, base = DEFAULT_MOMS[0], DEFAULT_MOMS[1]
                base, top = spec.get("base_momentum", base), spec.get("max_momentum", top)
                moms = (top, base, top)
            duration = spec["duration"]
            stages.append(
                cls(
                    freeze_to=spec["freeze_to"],
                    epochs=duration,
                    lr_max=list(lrs),
                    pct_start=spec.get("pct_start", 0.25),
                    div=div,
                    div_final=div * spec.get("final_div_factor", 1e4),
                    moms=moms,
                    name=label,
                )
            )
            expected_epoch = epoch + (duration if isinstance(duration, int) else 1)
        return stages


def fine_tune_stages(
    epochs: int,
    base_lr: float = 2e-3,
    freeze_epochs: int = 1,
    lr_mult: float = 100,
    pct_start: float = 0.3,
    div: float = 5.0,
    **kwargs: Any,
) -> list[Stage]:
    """fastai's ``fine_tune`` as a plan: the head alone, then everything with discriminative LRs.

    ``Stage(-1, freeze_epochs, slice(base_lr), pct_start=0.99)``, then
    ``Stage(0, epochs, slice(base_lr/2/lr_mult, base_lr/2), pct_start, div)``; ``kwargs``
    (``div_final``, ``wd``, ``moms``) go to both.

    Raises:
        TypeError, ValueError: An argument has the wrong type or is out of range.

    Examples:
        >>> [(s.freeze_to, s.epochs, s.lr_max) for s in fine_tune_stages(3, base_lr=2e-3)]
        [(-1, 1, slice(None, 0.002, None)), (0, 3, slice(1e-05, 0.001, None))]
    """
    check_int(epochs, "epochs", 1, what="a number of epochs")
    check_int(freeze_epochs, "freeze_epochs", 0, what="epochs of the frozen phase; 0 skips it")
    check_positive(base_lr, "base_lr")
    check_positive(lr_mult, "lr_mult")
    unknown = set(kwargs) - {"div_final", "wd", "moms"}
    if unknown:
        raise TypeError(
            f"fine_tune got unexpected argument(s) {sorted(unknown)}; it passes div_final, wd and "
            "moms to its one-cycles."
        )
    half = base_lr / 2
    unfrozen = Stage(0, epochs, slice(half / lr_mult, half), pct_start=pct_start, div=div, **kwargs)
    if not freeze_epochs:
        return [unfrozen]
    return [Stage(-1, freeze_epochs, slice(base_lr), pct_start=0.99, **kwargs), unfrozen]


def check_plan(
    stages: Any, n_groups: int | None = None, default_lr: LRSpec | None = None
) -> list[Stage]:
    """Validate a plan (a ``Stage`` or a non-empty list of them) for a model with ``n_groups``
    layer groups (``None``: types only), before anything trains."""
    if isinstance(stages, Stage):
        stages = [stages]
    if isinstance(stages, Mapping):
        raise TypeError(
            "got a dict: convert milestone dicts with Stage.from_milestones(milestones)."
        )
    stages = list(stages)
    if not stages or not all(isinstance(s, Stage) for s in stages):
        raise TypeError(f"a plan is a non-empty list of Stage, got {stages!r}.")
    if n_groups is not None:
        for stage in stages:
            stage.check(n_groups, default_lr)
    return stages
