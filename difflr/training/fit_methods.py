"""The fit methods of fastai, each a short function that builds a plan of stages.

`FitMethods` gives the `difflr.learner.Learner` its ``fit``, ``fit_one_cycle``, ``fit_flat_cos``
and ``fine_tune`` and their previews: each makes a list of `difflr.policy.stages.Stage`s and
hands it to the Learner's ``fit_stages`` (or ``preview_stages``), the one place a plan runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from difflr.optim.preview import SchedulePreview
from difflr.policy.lr import LRSpec
from difflr.policy.stages import Stage, fine_tune_stages

__all__ = ["FitMethods"]


class FitMethods:
    """The Learner's fit methods and their previews (the Learner sits above this module).

    A mixin: it holds no state and runs every plan through the Learner's ``fit_stages`` and
    ``preview_stages``.
    """

    fit_stages: Callable[..., None]
    preview_stages: Callable[..., SchedulePreview]

    def fit(
        self,
        n_epoch: int,
        lr: LRSpec | None = None,
        wd: float | None = None,
        ckpt_path: str | Path | None = None,
    ) -> None:
        """Train ``n_epoch`` epochs at a constant LR per group (momentum left as it is).

        Args:
            n_epoch: Number of epochs (>= 1).
            lr: LR spec; ``None`` uses the Learner's ``lr``.
            wd: Weight decay for this and later fits; ``None`` keeps the current one.
            ckpt_path: Resume this fit from a checkpoint (see `fit_one_cycle`).
        """
        self.fit_stages(Stage(None, n_epoch, lr, wd=wd, schedule="constant"), ckpt_path)

    def fit_one_cycle(
        self,
        n_epoch: int,
        lr_max: LRSpec | None = None,
        div: float = 25.0,
        div_final: float = 1e5,
        pct_start: float = 0.25,
        wd: float | None = None,
        moms: Sequence[float] | None = None,
        ckpt_path: str | Path | None = None,
    ) -> None:
        """Train with the one-cycle policy: per group, LR cosine from ``lr_max/div`` up to
        ``lr_max`` over ``pct_start`` of the steps, then down to ``lr_max/div_final``; momentum
        cosine ``moms[0] -> moms[1] -> moms[2]``.

        Args:
            n_epoch: Number of epochs (>= 1).
            lr_max: Peak LR spec; ``slice(lo, hi)`` spreads it geometrically from the stem to the
                head. ``None`` uses the Learner's ``lr``.
            div: Initial LR is ``lr_max / div`` (> 0).
            div_final: Final LR is ``lr_max / div_final`` (> 0).
            pct_start: Fraction of the steps spent warming up, in (0, 1).
            wd: Weight decay; ``None`` keeps the current one.
            moms: ``(start, middle, end)`` momentum; ``None`` uses the Learner's ``moms``.
            ckpt_path: Resume the fit that wrote this checkpoint (a path, or ``"last"``); see
                `fit_stages`.

        Examples:
            >>> learn.fit_one_cycle(4, lr_max=slice(1e-5, 1e-3))  # doctest: +SKIP
        """
        self.fit_stages(
            Stage(None, n_epoch, lr_max, pct_start, div, div_final, moms, wd), ckpt_path
        )

    def fit_flat_cos(
        self,
        n_epoch: int,
        lr: LRSpec | None = None,
        div_final: float = 1e5,
        pct_start: float = 0.75,
        wd: float | None = None,
        ckpt_path: str | Path | None = None,
    ) -> None:
        """Train at a flat LR for ``pct_start`` of the steps, then cosine down to
        ``lr/div_final`` (momentum left as it is)."""
        stage = Stage(None, n_epoch, lr, pct_start, div_final=div_final, wd=wd, schedule="flat_cos")
        self.fit_stages(stage, ckpt_path)

    def fine_tune(
        self,
        epochs: int,
        base_lr: float = 2e-3,
        freeze_epochs: int = 1,
        lr_mult: float = 100,
        pct_start: float = 0.3,
        div: float = 5.0,
        ckpt_path: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        """fastai's transfer-learning recipe: the head alone, then everything with
        discriminative LRs.

        ``freeze(); fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)``, then
        ``unfreeze(); fit_one_cycle(epochs, slice(base_lr/2/lr_mult, base_lr/2),
        pct_start=pct_start, div=div)``. The recorder holds both phases, with a boundary between.

        Args:
            epochs: Epochs of the unfrozen phase (>= 1).
            base_lr: Head LR of the frozen phase (halved for the unfrozen one).
            freeze_epochs: Epochs of the frozen phase (0 skips it).
            lr_mult: Ratio of the head's LR to the stem's in the unfrozen phase (> 0).
            pct_start: Warm-up fraction of the unfrozen phase.
            div: Initial LR divisor of the unfrozen phase.
            ckpt_path: Resume from a checkpoint written by the same call.
            **kwargs: Passed to both one-cycles (``div_final``, ``wd``, ``moms``).
        """
        plan = fine_tune_stages(epochs, base_lr, freeze_epochs, lr_mult, pct_start, div, **kwargs)
        self.fit_stages(plan, ckpt_path)

    def preview_one_cycle(
        self, n_epoch: int, lr_max: LRSpec | None = None, **kwargs: Any
    ) -> SchedulePreview:
        """The per-step, per-group LRs and momentums ``fit_one_cycle`` would use, without
        training (same arguments)."""
        return self.preview_stages(Stage(None, n_epoch, lr_max, **kwargs))

    def preview_fine_tune(self, epochs: int, **kwargs: Any) -> SchedulePreview:
        """The schedule ``fine_tune`` would use (both phases), without training."""
        return self.preview_stages(fine_tune_stages(epochs, **kwargs))
