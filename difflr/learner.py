"""The Learner: fastai's fine-tuning workflow as a facade over a LightningModule and Trainers.

Each fit method is a few lines that describe the training as a plan of `Stage`s and hand it to
`Learner.fit_stages`; each ``preview_*`` hands the same plan to `difflr.optim.preview.preview_plan`, so a
preview and the training cannot disagree. Building and running the Trainers is the `Runner`'s
job (``learn.runner``); ``save``, ``load`` and ``export`` come from
`difflr.training.persistence.Persistence`, the checkpoints of a fit from
`difflr.training.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from difflr import predictions
from difflr.callbacks.plateau import StagePlateau, check_monitors
from difflr.callbacks.recorder import Recorder
from difflr.callbacks.scheduler import stage_scheduler
from difflr.groups.adapters import check_lora_plus_ratio, lora_plus_scales
from difflr.groups.freezing import trainable_flags
from difflr.groups.layers import LayerGroup, Splitter, group_fingerprint, warn_single_group
from difflr.groups.splitters import split_model
from difflr.optim.implementation import OptFunc, describe_optimizer, make_optimizer
from difflr.optim.param_groups import build_param_groups, set_weight_decay
from difflr.optim.preview import SchedulePreview, preview_plan
from difflr.optim.stage_entry import enter_stage
from difflr.optim.summary import summary_table
from difflr.policy.freeze import check_freeze_to, frozen_pattern
from difflr.policy.lr import LRSpec, expand_lrs
from difflr.policy.schedules import DEFAULT_MOMS
from difflr.policy.stages import Stage, check_plan
from difflr.policy.suggestions import SuggestedLRs, valley
from difflr.training.checkpoints import FitRecord
from difflr.training.data import Data
from difflr.training.fit_methods import FitMethods
from difflr.training.loaders import check_vocab, defines_hook, find_vocab
from difflr.training.loggers import make_logger
from difflr.training.lr_finder import lr_find
from difflr.training.lr_finder_callback import LRFinder
from difflr.training.module import make_module
from difflr.training.persistence import Persistence
from difflr.training.runner import Runner
from difflr.training.sharding import Sharding, check_unsharded, is_sharding_strategy
from difflr.training.stage_lr import check_found_lrs, find_stage_lr
from difflr.utils.checks import check_moms, check_wd

__all__ = ["Learner"]


class Learner(FitMethods, Persistence):
    """Fine-tune a model with layer groups, discriminative LRs, freezing and the one-cycle policy.

    The model and one optimizer (with a param group per layer group, frozen ones included) live
    in the Learner; each fit method builds a fresh Lightning ``Trainer`` and trains for the
    requested epochs. Successive fits log to one continuous TensorBoard timeline.

    Args:
        model: An ``nn.Module`` (then ``loss_func`` is required) or a ``LightningModule`` (its
            ``training_step``/``validation_step`` are used; its ``configure_optimizers`` is
            superseded by the Learner's optimizer).
        data: ``(train_dl, valid_dl)`` (``valid_dl`` may be ``None``), a ``LightningDataModule``,
            or ``None`` when the LightningModule has its own dataloaders.
        loss_func: ``loss_func(preds, target) -> scalar`` for an ``nn.Module``; ``None`` for a
            model that computes its own loss from ``labels=`` (tuple or dict batches: see
            `difflr.training.module.forward_batch`).
        splitter: ``splitter(model)`` returning the layer groups; else ``model.model_splits()``,
            else a built-in or the repeated-blocks splitter (`difflr.groups.splitters`).
        opt_func: Optimizer factory ``opt_func(param_groups, lr=lr)``, used exactly as given;
            ``None``: AdamW with the fastest implementation torch runs where the parameters are
            (`difflr.optim.implementation.fastest`, which serves any torch optimizer).
        lr: Default LR spec of the fit methods (float, list per group or ``slice``).
        wd: Weight decay; ``None`` keeps the optimizer's default.
        wd_bn_bias: Also decay biases and normalisation-layer params.
        train_bn: Keep normalisation layers trainable inside frozen groups (``False``: they are
            frozen too, and run in eval mode while training, so their statistics stay put).
        moms: One-cycle momentum ``(start, middle, end)``, each in [0, 1).
        metrics: Functions ``(preds, targets) -> number`` (or torchmetrics metrics) computed on
            the validation set every epoch (``nn.Module`` models only).
        path: Folder for logs (and checkpoints).
        logger: ``True`` for TensorBoard under ``path``, ``False`` for none, or any Lightning
            logger.
        callbacks: Extra Lightning callbacks given to every Trainer.
        checkpoint: Keep ``path/checkpoints/last.ckpt`` for ``ckpt_path="last"``; ``None``: on
            unless ``enable_checkpointing=False``.
        monitor: Also keep ``path/checkpoints/best.ckpt``, the best epoch by this logged metric
            (``"valid_loss"`` is minimised, anything else maximised).
        check_finite: Stop at a NaN or infinite loss before the update (`FiniteLossGuard`);
            ``"grads"``: gradients too; ``False`` saves a host read of the loss per step.
        vocab: Class names, index ``i`` → ``vocab[i]``, for `predict` and
            ``ClassificationInterpretation``; ``None`` finds them in the data (see `vocab`).
        lora_plus_ratio: LoRA+ for a ``peft`` LoRA model: every group's B matrices (and 1-D
            adapter parameters, as in ``peft``) train at this multiple of the group's LR, through
            every schedule and the LR finder (16 in the paper); ``None``: off. See
            `difflr.groups.adapters`.
        **trainer_kwargs: Passed to every ``Trainer`` (``accelerator``, ``devices``,
            ``strategy``, ``precision``, ``accumulate_grad_batches``, ...). A strategy instance
            is copied for each Trainer; ``ModelParallelStrategy`` shards the model
            (`difflr.training.sharding`; the docs' "Scaling up" page).

    Raises:
        TypeError: ``model``, ``data``, ``opt_func``, ``loss_func`` or ``splitter`` has the wrong
            type.
        ValueError: The splitter misses or repeats parameters; a loader is empty; an argument
            is out of range.

    Examples:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> learn = Learner(model, (DataLoader(ds, batch_size=8), None), F.cross_entropy,
        ...                 splitter=lambda m: [m[0], m[2]], logger=False,
        ...                 enable_progress_bar=False)
        >>> [g.name for g in learn.splits]
        ['0.linear', '1.linear']
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any = None,
        loss_func: Callable[..., torch.Tensor] | None = None,
        *,
        splitter: Splitter | None = None,
        opt_func: OptFunc | None = None,
        lr: LRSpec = 1e-3,
        wd: float | None = None,
        wd_bn_bias: bool = False,
        train_bn: bool = True,
        moms: Sequence[float] = DEFAULT_MOMS,
        metrics: Any = None,
        path: str | Path = ".",
        logger: bool | Logger = True,
        callbacks: Sequence[pl.Callback] | None = None,
        checkpoint: bool | None = None,
        monitor: str | None = None,
        check_finite: bool | str = True,
        vocab: Sequence[Any] | None = None,
        lora_plus_ratio: float | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        self.lora_plus_ratio = check_lora_plus_ratio(lora_plus_ratio)
        self.module = make_module(model, loss_func, metrics, lambda: self.opt)
        self.model = model
        data = Data.from_arg(data, has_own_loaders=isinstance(model, pl.LightningModule))
        data.warn_unused_metrics(
            getattr(self.module, "metric_names", []),
            defines_hook(self.module, "val_dataloader", pl.LightningModule),
        )
        self.splits: list[LayerGroup] = split_model(model, splitter)
        expand_lrs(lr, len(self.splits), name="lr")
        self.lr = lr
        self.wd = check_wd(wd)
        self.train_bn = bool(train_bn)
        self.wd_bn_bias = bool(wd_bn_bias)
        self.moms = check_moms(moms)
        scales = None
        if self.lora_plus_ratio is not None:
            scales = lora_plus_scales(model, self.splits, self.lora_plus_ratio)
        self.opt = make_optimizer(
            opt_func, build_param_groups(model, self.splits, wd_bn_bias, scales), lr, self.n_groups
        )
        set_weight_decay(self.opt, self.wd)
        self.path = Path(path)
        self._id = uuid.uuid4().hex  # names this Learner in its checkpoints
        self._peak_lrs: list[float] | None = None  # the last fit's peak LR per group
        self.recorder = Recorder(log_hypers=logger is not False and logger is not None)
        self.runner = Runner(
            self.module,
            self.opt,
            data,
            path=self.path,
            logger=make_logger(logger, self.path),
            recorder=self.recorder,
            callbacks=list(callbacks or []),
            checkpoint=checkpoint,
            monitor=monitor,
            check_finite=check_finite,
            trainer_kwargs=trainer_kwargs,
            owner=self._id,
            train_bn=self.train_bn,
            sharding=Sharding(model, self.splits, splitter),
        )
        #: The Trainer of the last fit (``None`` before the first).
        self.trainer: pl.Trainer | None = None
        self._frozen = [not t for t in trainable_flags(self.splits)]
        self._run: str | None = None  # the id of its last fit call
        self._vocab = check_vocab(vocab)

    # ----------------------------------------------------------------------------- data, parts
    @property
    def train_dl(self) -> Any:
        """The training loader (None with a datamodule)."""
        return self.runner.data.train_dl

    @property
    def valid_dl(self) -> Any:
        """The validation loader (or None)."""
        return self.runner.data.valid_dl

    @property
    def datamodule(self) -> pl.LightningDataModule | None:
        """The LightningDataModule, if any."""
        return self.runner.data.datamodule

    @property
    def logger(self) -> Logger | None:
        """The logger every fit writes to (``None``: no logging)."""
        return self.runner.logger

    @property
    def trainer_kwargs(self) -> dict[str, Any]:
        """Trainer arguments for every fit (a dict you may change between fits)."""
        return self.runner.trainer_kwargs

    @property
    def callbacks(self) -> list[pl.Callback]:
        """Your callbacks, in every fit (a list you may change between fits)."""
        return self.runner.callbacks

    # ----------------------------------------------------------------------------- freezing
    @property
    def n_groups(self) -> int:
        """Number of layer groups."""
        return len(self.splits)

    @property
    def frozen(self) -> list[bool]:
        """For each layer group, whether it is frozen."""
        return list(self._frozen)

    def freeze_to(self, n: int) -> None:
        """Freeze layer groups ``[:n]`` and train the rest (negative ``n`` counts from the end).

        With ``train_bn=True`` normalisation layers stay trainable in frozen groups (with
        ``train_bn=False`` they are frozen too, and run in eval mode). A change of the frozen
        pattern clears the optimizer's state (momentum buffers), as in fastai. Each stage of a
        fit is entered the same way (`difflr.optim.stage_entry.enter_stage`).

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: ``n`` is outside ``[-n_groups, n_groups]``.
        """
        self._enter_stage(self._frozen_pattern(n), previous=self._frozen)

    def freeze(self) -> None:
        """Train the last layer group (the head) only: ``freeze_to(-1)``."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Train every layer group: ``freeze_to(0)``."""
        self.freeze_to(0)

    def _frozen_pattern(self, n: int) -> list[bool]:
        """The pattern of ``freeze_to(n)``, checked, with the single-group warning."""
        check_freeze_to(n, self.n_groups)
        warn_single_group(self.splits, f"freeze_to({n})")
        return frozen_pattern(n, self.n_groups)

    def _enter_stage(
        self,
        frozen: Sequence[bool] | None,
        *,
        previous: Sequence[bool] | None,
        wd: float | None = None,
    ) -> None:
        """`difflr.optim.stage_entry.enter_stage` for the Learner's model; the pattern and the
        weight decay are remembered."""
        enter_stage(
            self.model,
            self.splits,
            self.opt,
            frozen,
            previous=previous,
            train_bn=self.train_bn,
            wd=wd,
        )
        if frozen is not None:
            self._frozen = list(frozen)
        if wd is not None:
            self.wd = wd

    # ----------------------------------------------------------------------------- fitting
    def fit_stages(
        self,
        stages: Stage | Sequence[Stage],
        ckpt_path: str | Path | None = None,
        *,
        restore_best: bool = False,
    ) -> None:
        """Run a plan: for each stage, its frozen pattern (``freeze_to``), its weight decay and
        its schedule over its epochs, in a fresh Trainer. Every fit method comes here.

        A stage whose ``lr_max`` names a suggestion (``Stage(0, 3, "valley", lr_mult=100)``)
        finds its LR when it starts: with its frozen pattern in place, the range test
        (``lr_find``, which leaves the Learner exactly as it was) sweeps with the stage's ratios
        between groups, and the suggestion ``s`` (the head's LR) becomes its ``lr_max``
        (``slice(s / lr_mult, s)``). ``recorder.lr_finds`` and ``recorder.stage_lrs`` keep each
        sweep and LR, and the checkpoints record the LR, which a resume uses instead of sweeping.

        Args:
            stages: A ``Stage`` or a list of them, e.g. ``Stage.from_milestones(milestones)``.
            ckpt_path: Resume the same plan from a checkpoint (a path, or ``"last"``): the stages
                it had finished are skipped and the one it was in resumes from it (weights,
                optimizer state, freeze pattern, schedule position, recorder, epoch).
            restore_best: Give every stage ``restore_best=True``: at each stage's end, the
                weights of its best epoch (by the stage's ``monitor``) are loaded before the
                next stage. A stage with ``patience`` ends at its plateau (see
                ``docs/plans.md``).

        Raises:
            ValueError: A stage does not fit the model (``freeze_to`` out of range, ``lr_max``
                of the wrong length) or monitors a value no epoch provides, a stage that finds its LR
                cannot sweep (``limit_train_batches=0``) or is resumed from a checkpoint that lacks
                the LR it found, or ``learn.callbacks`` holds an `difflr.LRFinder` (it would
                rescale the plan's LRs); nothing has run then. A range test that suggests no finite LR
                stops the plan at that stage's start (the stages before it are done).

        Examples:
            >>> learn.fit_stages(Stage.from_milestones(milestones))  # doctest: +SKIP
        """
        stages = check_plan(stages, self.n_groups, self.lr)
        if restore_best:
            stages = [dataclasses.replace(s, restore_best=restore_best) for s in stages]
        validates = self.valid_dl is not None or self.datamodule is not None
        epoch_values = getattr(self.module, "epoch_values", None)  # None: the user's module
        check_monitors(
            stages,
            None if epoch_values is None else epoch_values(validates),
            sharded=is_sharding_strategy(self.runner.trainer_kwargs.get("strategy")),
        )
        if any(isinstance(cb, LRFinder) for cb in self.callbacks):
            raise ValueError(
                "LRFinder is a callback for your own Trainer: in a Learner's fit it would rescale "
                "the LRs of the plan you gave. Remove it from learn.callbacks, and call "
                "learn.lr_find() before the fit, or give a stage lr_max='valley' to find its LR "
                "when it starts."
            )
        self.runner.check_schedulable()
        # A stage that finds its LR gets its scheduler once the LR is known.
        schedulers = [
            None if stage.finds_lr else stage_scheduler(stage, self.opt, self.lr, self.moms)
            for stage in stages
        ]
        plan = self.runner.describe_fit(
            stages, self.lr, self.moms, group_fingerprint(self.model, self.splits)
        )
        resume = self.runner.resume_point(ckpt_path, plan, self._id, self._run)
        found = check_found_lrs(stages, self.runner, resume)  # {stage: LR found}, resumed ones
        self._run = uuid.uuid4().hex if resume is None else resume.run
        self.recorder.reset()
        self._note_peak_lrs(stages, found)
        self.runner.table.start()
        for k in range(0 if resume is None else resume.stage, len(stages)):
            resuming = resume is not None and k == resume.stage
            if resuming:  # the checkpoint's optimizer state was made under its pattern: kept
                frozen, previous = resume.frozen, resume.frozen
            elif stages[k].freeze_to is not None:
                frozen, previous = self._frozen_pattern(stages[k].freeze_to), self._frozen
            else:
                frozen, previous = None, None
            self._enter_stage(frozen, previous=previous, wd=stages[k].wd)
            stage, scheduler = stages[k], schedulers[k]
            if stage.finds_lr:  # swept on the pattern just entered; a resume reads the record
                if k not in found:
                    found[k] = find_stage_lr(self, stage, k)
                stage = stage.with_found_lr(found[k])
                scheduler = stage_scheduler(stage, self.opt, self.lr, self.moms)
                self._note_peak_lrs(stages, found)
            record = FitRecord(
                learner=self._id, run=self._run, stage=k, plan=plan, found_lrs=dict(found)
            )
            watch = [StagePlateau(stage, scheduler)] if stage.watches else []
            self.trainer = self.runner.fit_stage(
                stage, scheduler, record, self._frozen, resume if resuming else None, watch
            )

    def _note_peak_lrs(self, stages: Sequence[Stage], found: Mapping[int, float]) -> None:
        """The plan's peak LR per group (for `summary`), over the stages whose LR is known."""
        known = [
            stage.with_found_lr(found[k]) if stage.finds_lr and k in found else stage
            for k, stage in enumerate(stages)
        ]
        lrs = [stage.lrs(self.n_groups, self.lr) for stage in known if not stage.finds_lr]
        self._peak_lrs = [max(group) for group in zip(*lrs)] if lrs else None

    # ----------------------------------------------------------------------------- previews
    def preview_stages(
        self,
        stages: Stage | Sequence[Stage],
        *,
        plateau_at: Mapping[int, int] | None = None,
        found_lrs: Mapping[int, float] | None = None,
    ) -> SchedulePreview:
        """The schedule ``fit_stages`` would use, stage by stage, without training.

        A stage with ``patience`` is drawn over its maximum epochs, or, with
        ``plateau_at={stage_index: epoch}``, as it runs when its plateau is detected at the end
        of its epoch ``epoch`` (0-based). A stage whose LR is found at its start
        (``lr_max="valley"``) is drawn with ``found_lrs[k]`` (e.g. ``learn.recorder.stage_lrs``
        after the fit), else with the head group's ``lr`` of the Learner as a stand-in, listed in
        the preview's ``stand_ins``."""
        plan = check_plan(stages, self.n_groups, self.lr)
        return preview_plan(
            plan,
            self.opt,
            self._frozen,
            self.runner.steps_per_epoch(),
            self.lr,
            self.moms,
            plateau_at=plateau_at,
            found_lrs=found_lrs,
        )

    # ----------------------------------------------------------------------------- lr_find
    def lr_find(
        self,
        start_lr: LRSpec = 1e-7,
        end_lr: LRSpec = 10.0,
        num_it: int = 100,
        stop_div: bool = True,
        show_plot: bool = True,
        suggest_funcs: Any = (valley,),
        snapshot: str = "memory",
    ) -> SuggestedLRs | None:
        """The LR range test: train ``num_it`` steps with an exponentially growing LR, suggest an
        LR from the loss curve, and leave the Learner exactly as it was.

        Step ``i`` uses ``start * (end / start) ** (i / num_it)`` for every group, so list or
        slice bounds keep the ratios between groups. Weights, buffers, optimizer state, flags,
        modes and RNG states are restored bit for bit, also after an error or an interrupt.

        Args:
            start_lr: First LR: a float, a list per group or a slice (see ``expand_lrs``).
            end_lr: LR that the sweep would reach at step ``num_it``; above ``start_lr``.
            num_it: Number of steps (>= 2); the training loader is repeated as needed.
            stop_div: Stop once the smoothed loss exceeds 4x the best or is not finite.
            show_plot: Show the loss-vs-LR figure inline (in Jupyter; nothing in a script).
            suggest_funcs: Functions ``(lrs, losses) -> lr`` applied to the curve without its
                first ``num_it // 10`` and last 5 points, on the head group's LR; ``None`` for
                none (the sweep is recorded and plotted, and ``None`` returned).
            snapshot: ``"memory"`` (fast) or ``"disk"`` (a file under ``path``, removed after;
                for a model too large to hold twice).

        Returns:
            A ``SuggestedLRs`` namedtuple, one field per suggestion function (``res.valley``).
            ``learn.recorder`` holds the sweep (``lrs``, ``losses``, ``plot_lr_find()``).

        Raises:
            ValueError: ``start_lr >= end_lr`` for a group, a non-positive bound, ``num_it < 2``.
        """
        return lr_find(self, start_lr, end_lr, num_it, stop_div, show_plot, suggest_funcs, snapshot)

    # ----------------------------------------------------------------------------- after the fit
    @property
    def vocab(self) -> list[Any] | None:
        """Class names, index ``i`` → ``vocab[i]``: as given (``Learner(vocab=...)`` or
        ``learn.vocab = [...]``), else the ``vocab`` or ``classes`` of the datamodule or of the
        validation or training dataset (torchvision's ``ImageFolder`` has ``classes``), else
        ``None`` (class indices are shown)."""
        return self._vocab if self._vocab is not None else find_vocab(self.runner.data)

    @vocab.setter
    def vocab(self, names: Sequence[Any] | None) -> None:
        self._vocab = check_vocab(names)

    def validate(self, dl: Any = None) -> dict[str, float]:
        """``{"valid_loss": ..., "<metric>": ...}`` on the validation set (or ``dl``), keyed as
        in the epoch table, through ``Trainer.validate`` in eval mode; nothing is recorded or
        logged (`difflr.predictions.validate`).

        Raises:
            ValueError: There is no validation set and no ``dl``; the loader is empty.
        """
        return predictions.validate(self.runner, dl)

    def get_preds(
        self,
        dl: Any = None,
        with_input: bool = False,
        with_loss: bool = False,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[Any, ...]:
        """``(inputs?, preds, targets, losses?)`` for every item of the validation set (or
        ``dl``), in dataset order, as CPU tensors, through ``Trainer.predict``; gathered once
        under DDP (`difflr.predictions.get_preds`).

        Args:
            dl: A loader; ``None`` for the validation set. A shuffling or ``drop_last``
                ``DataLoader`` is read without either.
            with_input: Also return the inputs (first).
            with_loss: Also return each item's loss (last), shape ``(n_items,)``.
            act: Applied to the outputs; ``None``: softmax for cross-entropy, sigmoid for BCE
                with logits, ``exp`` for NLL, else identity.
        """
        return predictions.get_preds(self.runner, dl, with_input, with_loss, act)

    def predict(self, x: Any, *, is_batch: bool | None = None) -> Any:
        """Predict one item or a batch (``is_batch``: ``None`` compares ``x`` with an item of
        the data) in eval mode, without gradient, on the model's device; for a classifier
        ``(decoded, index, probs)`` with the class name from `vocab`, else the raw output
        (`difflr.predictions.predict`).

        Examples:
            >>> learn.predict(x_valid[0])  # doctest: +SKIP
            ('seven', tensor(7), tensor([0.0010, ..., 0.0021]))
        """
        check_unsharded(self.model, "predict(x)", "use get_preds(dl) on every rank")
        return predictions.predict(self.runner, x, vocab=self.vocab, is_batch=is_batch)

    # ----------------------------------------------------------------------------- inspection
    def summary(self) -> str:
        """A table of the layer groups (name, parameters, trainable state, LR, the modules each
        holds), a line per tied parameter saying which group trains it, and the optimizer with
        the implementation its step runs (e.g. ``AdamW (fused)``).

        The LR column is what a user means by "the LR": before any fit, ``lr`` is the Learner's
        LR spread over the groups (what a fit without ``lr_max`` uses); after a fit, ``peak_lr``
        is that fit's peak per group (the schedule's own value at its end, e.g. ``lr_max /
        div_final`` after a one-cycle, is in ``recorder.lrs``)."""
        if self._peak_lrs is None:
            return summary_table(
                self.model,
                self.splits,
                self._frozen,
                self.opt,
                "lr",
                expand_lrs(self.lr, self.n_groups),
            )
        return summary_table(
            self.model, self.splits, self._frozen, self.opt, "peak_lr", self._peak_lrs
        )

    def __repr__(self) -> str:
        return (
            f"Learner({type(self.model).__name__}, {self.n_groups} layer groups, "
            f"opt={describe_optimizer(self.opt)}, frozen={sum(self._frozen)}/{self.n_groups})"
        )
