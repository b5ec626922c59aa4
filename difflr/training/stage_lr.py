"""An LR found per stage: the range test that gives a stage its peak LR when it starts.

A `difflr.policy.stages.Stage` whose ``lr_max`` names a suggestion function
(``Stage(0, 3, "valley", lr_mult=100)``) has no LR until ``Learner.fit_stages`` reaches it: once
the stage's frozen pattern is in place, `find_stage_lr` runs ``lr_find`` (the transaction of
`difflr.training.lr_finder`, which leaves the model, the optimizer and the RNG states as they
were) with the ratios the stage will train with, and the suggestion becomes the stage's LR. The
recorder keeps each stage's sweep (``recorder.lr_finds``), the logger gets the LR chosen, and the
fit's checkpoints record it (``FitRecord.found_lrs``), so that a resume uses it instead of
sweeping again (`check_found_lrs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from difflr.policy.stages import Stage
from difflr.policy.suggestions import SuggestedLRs
from difflr.training.checkpoints import Resume
from difflr.training.lr_finder import Sweepable, lr_find
from difflr.training.runner import Runner
from difflr.utils.rng import RngState, loader_generators

__all__ = ["check_found_lrs", "find_stage_lr"]


def check_found_lrs(
    stages: Sequence[Stage], runner: Runner, resume: Resume | None
) -> dict[int, float]:
    """Refuse, before anything changes, a plan whose stages cannot find their LR; return the LRs
    already found (``{stage: lr}``) that a resume takes from its checkpoint.

    Raises:
        ValueError: ``limit_train_batches=0`` leaves the range test no batch; the checkpoint a
            plan resumes from lacks the LR found for a stage that had started.
    """
    finding = [k for k, stage in enumerate(stages) if stage.finds_lr]
    if not finding:
        return {}
    if runner.trainer_kwargs.get("limit_train_batches") in (0, 0.0):
        raise ValueError(
            f"stage(s) {finding} find their LR with a range test, and limit_train_batches=0 "
            "leaves it no batch to train on; drop limit_train_batches, or give those stages an "
            "lr_max."
        )
    if resume is None:
        return {}
    missing = [k for k in finding if k <= resume.stage and k not in resume.found_lrs]
    if missing:
        raise ValueError(
            f"{resume.path} does not record the LR found at the start of stage(s) {missing} "
            "(lr_max names a suggestion), so the resumed stages could not train as the "
            "interrupted ones did; sweeping again would find another LR. Start the plan anew "
            "without ckpt_path."
        )
    return {k: lr for k, lr in resume.found_lrs.items() if k in finding}


def find_stage_lr(learn: Sweepable, stage: Stage, index: int) -> float:
    """Run the range test of ``stage`` (the ``index``-th of its plan) on ``learn`` as it is now
    (its frozen pattern entered) and return the suggestion: the head group's LR.

    ``lr_find`` sweeps ``stage.sweep_bounds()`` (the ratios of ``lr_mult``) with the stage's
    ``lr_find_kwargs`` and its suggestion function, and shows no plot. The recorder keeps what
    it recorded before (`difflr.callbacks.recorder.Recorder.set_aside`) and files the sweep under
    ``lr_finds[index]``; the data loaders' generators are put back too, so that the stage trains
    as it would have with its LR given. The logger gets the LR chosen, ``lr_find/stage_{index}``
    at the stage's first step, and the sweep, ``lr_find/stage_{index}_lr`` and
    ``lr_find/stage_{index}_loss`` at the sweep's iterations from there.
    """
    start, end = stage.sweep_bounds()
    kwargs = {
        key: value
        for key, value in (stage.lr_find_kwargs or {}).items()
        if key not in ("start_lr", "end_lr")
    }
    data = learn.runner.data
    generators = [
        g
        for loader in (data.train_dl, data.valid_dl)
        if loader is not None
        for g in loader_generators(loader)
    ]
    states = RngState.capture(generators)
    recorder = learn.recorder
    try:
        with recorder.set_aside():
            suggested = lr_find(
                learn, start, end, show_plot=False, suggest_funcs=(stage.suggestion,), **kwargs
            )
            lr = float(cast(SuggestedLRs, suggested)[0])  # one suggestion function: one value
            recorder.add_stage_lr_find(index, lr)
    finally:
        states.restore_loaders(generators)
    _log_sweep(learn.runner.logger, index, recorder.lr_finds[index])
    return lr


def _log_sweep(logger: Any, index: int, sweep: dict[str, Any]) -> None:
    if logger is None:
        return
    logger.log_metrics({f"lr_find/stage_{index}": sweep["suggestion"]}, step=0)
    for i, (lr, loss) in enumerate(zip(sweep["lrs"][:, -1], sweep["losses"])):
        logger.log_metrics(
            {f"lr_find/stage_{index}_lr": float(lr), f"lr_find/stage_{index}_loss": float(loss)},
            step=i,
        )
