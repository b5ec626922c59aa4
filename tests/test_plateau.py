"""Plateau-driven stages: the rule in closed form, a scripted validation curve that plateaus at a
known epoch (where the stage ends, every step's LR, the best weights restored bit for bit), an
exact resume mid-plateau, GradualUnfreezing with a plateau stage, and the errors."""

from __future__ import annotations

import dataclasses
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from difflr import GradualUnfreezing, LRFinder, Recorder, Stage
from difflr.policy.plateau import Anneal, PlateauWatch, scheduled_pct, stage_length
from difflr.policy.schedules import one_cycle_lr, sample
from tests.helpers import make_learner, make_loaders, make_model, make_trainer, three_groups

SPE = 2  # optimizer steps per epoch of the tiny loaders below


def tiny_loaders():
    return make_loaders(n=32, batch_size=16)


def scripted(values):
    """A metric named ``score`` whose value at the k-th validation is ``values[k]``."""
    it = iter(values)

    def score(preds, targets):
        return float(next(it))

    return score


class CrashAtBatch(Callback):
    """Raise at the ``n``-th training batch of the whole plan (0-based): a run killed mid-way."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen == self.n:
            raise RuntimeError("simulated crash")
        self.seen += 1


class Snapshots(Callback):
    """The module's weights after each epoch's training (at its validation's end), by the
    Trainer's epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer, pl_module):
        state = pl_module.state_dict()
        self.by_epoch[trainer.current_epoch] = {k: v.clone() for k, v in state.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- the rule, pure
def test_the_watch_follows_lightnings_early_stopping_rule_then_anneals():
    watch = PlateauWatch(epochs=10, patience=2, mode="min", min_delta=0.1, anneal_epochs=3)
    # 1.0 best; 0.95 is not better by more than 0.1; 0.85 is; then two epochs without.
    verdicts = [watch.end_of_epoch(e, v) for e, v in enumerate([1.0, 0.95, 0.85, 0.8, 0.9])]
    assert [v.improved for v in verdicts] == [True, False, True, False, False]
    assert [v.anneal_epochs for v in verdicts] == [None, None, None, None, 3]
    assert (watch.best, watch.best_epoch, watch.wait) == (0.85, 2, 2)
    assert (watch.plateau_epoch, watch.end_epoch) == (4, 7)
    assert [watch.end_of_epoch(e, 0.0).stage_ends for e in (5, 6, 7)] == [False, False, True]
    assert watch.best_epoch == 5  # the tail's epochs count for the best weights too


def test_the_watch_in_max_mode_ignores_nan_and_resumes_from_its_state():
    watch = PlateauWatch(epochs=6, patience=2, mode="max", anneal_epochs=0)
    watch.end_of_epoch(0, 0.5)
    watch.end_of_epoch(1, math.nan)  # never an improvement
    copy = PlateauWatch(epochs=6, patience=2, mode="max", anneal_epochs=0)
    copy.load_state_dict(watch.state_dict())
    assert copy.end_of_epoch(2, 0.4) == watch.end_of_epoch(2, 0.4)
    assert (
        copy.state_dict()
        == watch.state_dict()
        == {
            "best": 0.5,
            "best_epoch": 0,
            "wait": 2,
            "plateau_epoch": 2,
            "end_epoch": 2,
        }
    )


def test_a_plateau_at_the_last_epoch_changes_nothing():
    watch = PlateauWatch(epochs=2, patience=1)
    assert watch.end_of_epoch(0, 1.0).stage_ends is False
    verdict = watch.end_of_epoch(1, 2.0)
    assert (verdict.anneal_epochs, verdict.stage_ends, watch.plateau_epoch) == (None, True, None)


def test_the_tail_continues_the_schedule_where_it_is_or_from_its_peak():
    assert Anneal.at(10, 16, 4, 0.25) == Anneal(10, 4, 0.625)
    assert Anneal.at(2, 16, 4, 0.25) == Anneal(2, 4, 0.25)  # inside the warm-up: from the peak
    tail = Anneal(10, 4, 0.625)
    assert [scheduled_pct(s, 16, tail) for s in (9, 10, 11, 13, 14)] == [
        9 / 16,
        0.625,
        0.625 + 0.375 / 4,
        0.625 + 0.375 * 3 / 4,
        1.0,
    ]
    # A tail that starts past the warm-up and lasts the rest of the maximum is the plain schedule.
    sched = one_cycle_lr(np.array([1e-3, 1e-2]), pct_start=0.25)
    plain, _ = sample(sched, None, 16, 2)
    remapped, _ = sample(sched, None, 16, 2, Anneal.at(8, 16, 8, 0.25))
    np.testing.assert_array_equal(plain, remapped)
    assert [stage_length(8, e, 2) for e in (None, 2, 5, 6)] == [8, 5, 8, 8]


# ------------------------------------------------------------------------------- Stage
def test_stage_checks_its_plateau_fields():
    for kwargs, error, match in [
        ({"patience": 0}, ValueError, "patience must be an int >= 1"),
        ({"patience": 1.5}, TypeError, "patience must be an int"),
        ({"mode": "median"}, ValueError, "mode must be 'min' or 'max', got 'median'"),
        ({"min_delta": -0.1}, ValueError, "min_delta must be a finite number >= 0"),
        ({"anneal_epochs": -1}, ValueError, "anneal_epochs must be an int >= 0"),
        ({"monitor": ""}, TypeError, "monitor must be the name of a value"),
        ({"restore_best": "yes"}, TypeError, "restore_best must be True or False"),
    ]:
        with pytest.raises(error, match=match):
            Stage(0, 4, 1e-3, **kwargs)


def test_the_description_holds_the_plateau_rule_only_for_stages_that_watch():
    assert "plateau" not in Stage(0, 4, 1e-3).describe(3)
    described = Stage(0, 4, 1e-3, patience=2, monitor="score", mode="max").describe(3)
    assert described["plateau"] == {
        "patience": 2,
        "monitor": "score",
        "mode": "max",
        "min_delta": 0.0,
        "restore_best": False,
        "anneal_epochs": 1,
    }
    assert Stage(0, 4, 1e-3, restore_best=True).describe(3)["plateau"]["patience"] is None


# ------------------------------------------------------------------------------- fit_stages
def test_a_scripted_plateau_ends_the_stage_and_restores_the_best_epoch(tmp_path):
    # Best 0.7 at epoch 2; epochs 3, 4 do not improve: the plateau is detected at epoch 4's end;
    # two tail epochs (5, 6), then the stage ends, after 7 of its 8 epochs. Epoch 5 is the best.
    scores = [0.5, 0.6, 0.7, 0.65, 0.66, 0.9, 0.1]
    snapshots = Snapshots()
    learn = make_learner(
        tmp_path, data=tiny_loaders(), metrics=[scripted(scores)], callbacks=[snapshots]
    )
    plan = Stage(
        0, 8, 1e-2, patience=2, monitor="score", mode="max", anneal_epochs=2, restore_best=True
    )
    learn.fit_stages(plan)

    assert [row["score"] for row in learn.recorder.values] == pytest.approx(scores)
    assert learn.trainer.current_epoch == 7
    assert len(learn.recorder.lrs) == 7 * SPE
    # The tail: steps 10..13 of 16 follow the one-cycle from pct 10/16 to 1.
    lrs = np.array(Stage(0, 8, 1e-2).lrs(3))
    sched = one_cycle_lr(lrs, pct_start=0.25)
    pcts = [s / 16 for s in range(10)] + [0.625 + 0.375 * j / 4 for j in range(4)]
    np.testing.assert_allclose(learn.recorder.lrs, [sched(p) for p in pcts], rtol=1e-12)
    np.testing.assert_allclose(
        learn.recorder.lrs, learn.preview_stages(plan, plateau_at={0: 4}).lrs, rtol=1e-12
    )
    assert same(learn.module.state_dict(), snapshots.by_epoch[5])
    assert not same(learn.module.state_dict(), snapshots.by_epoch[6])
    assert len(learn.preview_stages(plan).lrs) == 8 * SPE  # by default: over the maximum


def test_restore_best_on_a_fixed_stage_and_for_the_whole_plan(tmp_path):
    snapshots = Snapshots()
    learn = make_learner(
        tmp_path, data=tiny_loaders(), metrics=[scripted([0.9, 0.2, 0.3])], callbacks=[snapshots]
    )
    learn.fit_stages(Stage(0, 3, 1e-2, monitor="score", mode="min"), restore_best=True)
    assert len(learn.recorder.values) == 3  # no patience: a fixed length
    assert same(learn.module.state_dict(), snapshots.by_epoch[1])


@pytest.mark.parametrize("crash_at", [3 * SPE, 4 * SPE], ids=["in the tail", "next stage"])
def test_a_plateau_plan_killed_mid_way_resumes_to_the_same_weights(tmp_path, crash_at):
    # Stage 0: best at epoch 1, plateau at epoch 2 (patience 1), tail epoch 3, then stage 1
    # starts from epoch 1's weights. A crash in the tail needs the plateau, the tail and the best
    # weights from the checkpoint; one at stage 1's first batch resumes a stage that had ended.
    scores = [0.5, 0.7, 0.6, 0.65, 0.1, 0.1]

    def plan():
        return [
            Stage(-1, 6, 1e-2, patience=1, monitor="score", mode="max", restore_best=True),
            Stage(0, 2, slice(1e-4, 1e-2)),
        ]

    full = make_learner(tmp_path / "full", data=tiny_loaders(), metrics=[scripted(scores)])
    full.fit_stages(plan())
    assert [len(full.recorder.values), full.recorder.boundaries] == [6, [0, 4 * SPE]]

    crashed = make_learner(
        tmp_path / "run",
        data=tiny_loaders(),
        metrics=[scripted(scores)],
        callbacks=[CrashAtBatch(crash_at)],
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit_stages(plan())
    done = crash_at // SPE
    resumed = make_learner(tmp_path / "run", data=tiny_loaders(), metrics=[scripted(scores[done:])])
    with pytest.warns(UserWarning, match="written by another Learner of this process"):
        resumed.fit_stages(plan(), ckpt_path="last")
    assert same(resumed.module.state_dict(), full.module.state_dict())
    np.testing.assert_array_equal(resumed.recorder.lrs, full.recorder.lrs)
    assert resumed.recorder.boundaries == full.recorder.boundaries
    assert [r["epoch"] for r in resumed.recorder.values] == list(range(6))


def test_monitoring_a_value_no_epoch_provides_is_refused_before_training(tmp_path):
    learn = make_learner(tmp_path, data=tiny_loaders(), metrics=[scripted([])])
    before = {k: v.clone() for k, v in learn.module.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"monitors 'acc'.*\['train_loss', 'valid_loss', 'score'\]"
    ):
        learn.fit_stages(Stage(0, 3, 1e-3, patience=1, monitor="acc"))
    no_valid = make_learner(tmp_path / "nv", data=(tiny_loaders()[0], None))
    with pytest.raises(ValueError, match=r"\['train_loss'\].*pass data=\(train_dl, valid_dl\)"):
        no_valid.fit_stages(Stage(0, 3, 1e-3, patience=1))
    assert same(learn.module.state_dict(), before)
    assert not (tmp_path / "checkpoints").exists()


def test_preview_checks_the_plateau_epoch(tmp_path):
    learn = make_learner(tmp_path, data=tiny_loaders())
    plan = [Stage(-1, 2, 1e-3), Stage(0, 6, 1e-3, patience=2, anneal_epochs=0)]
    assert len(learn.preview_stages(plan, plateau_at={1: 1}).lrs) == (2 + 2) * SPE
    with pytest.raises(ValueError, match=r"names stage 0, but the plan's stages with patience"):
        learn.preview_stages(plan, plateau_at={0: 1})
    with pytest.raises(ValueError, match=r"plateau_at\[1\] is 5, .* epochs 1\.\.4"):
        learn.preview_stages(plan, plateau_at={1: 5})


# ------------------------------------------------------------------------------- GradualUnfreezing
class ScriptedModule(pl.LightningModule):
    """Logs ``score`` = ``scores[epoch]`` at each validation."""

    def __init__(self, scores) -> None:
        super().__init__()
        self.net, self.scores = make_model(), scores

    def model_splits(self):
        return list(three_groups(self.net).values())

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("score", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


def test_gradual_unfreezing_moves_on_at_the_plateau_with_the_best_weights():
    module = ScriptedModule([0.5, 0.7, 0.6, 0.65, 0.1, 0.1, 0.1, 0.1])
    plan = [
        Stage(-1, 6, 1e-2, patience=1, monitor="score", mode="max", restore_best=True),
        Stage(0, 2, 1e-3),
    ]
    callback, snapshots, recorder = GradualUnfreezing(plan), Snapshots(), Recorder(False)
    starts = {}

    class StageStart(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            starts[trainer.current_epoch] = {
                k: v.clone() for k, v in pl_module.state_dict().items()
            }

    trainer = make_trainer(max_epochs=8, callbacks=[callback, snapshots, recorder, StageStart()])
    train, valid = tiny_loaders()
    trainer.fit(module, train, valid)
    assert callback.starts == [0, 4]
    assert trainer.current_epoch == 6  # the plan's end stops the fit
    assert same(starts[4], snapshots.by_epoch[1])  # stage 1 starts from stage 0's best epoch
    assert callback.stage == 1 and module.net[0].weight.requires_grad  # stage 1 unfroze all
    sched = one_cycle_lr(np.full(3, 1e-2), pct_start=0.25)
    pcts = [s / 12 for s in range(3 * SPE)] + [0.5 + 0.5 * j / SPE for j in range(SPE)]
    np.testing.assert_allclose(recorder.lrs[: 4 * SPE], [sched(p) for p in pcts], rtol=1e-12)


def test_gradual_unfreezing_names_the_values_when_the_monitor_is_missing():
    module = ScriptedModule([0.5] * 4)
    plan = [Stage(-1, 3, 1e-2, patience=1, monitor="acc")]
    trainer = make_trainer(max_epochs=3, callbacks=[GradualUnfreezing(plan)])
    train, valid = tiny_loaders()
    with pytest.raises(ValueError, match=r"monitors 'acc'.*the values are \['score'\]"):
        trainer.fit(module, train, valid)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("crash_at", [3 * SPE, 4 * SPE + 1], ids=["in the tail", "next stage"])
def test_gradual_unfreezing_resumes_a_plateau_plan_to_the_same_weights(tmp_path, crash_at):
    scores = [0.5, 0.7, 0.6, 0.65, 0.1, 0.1]

    def fit(callbacks, ckpt_path=None):
        module = ScriptedModule(scores)
        plan = [
            Stage(-1, 6, 1e-2, patience=1, monitor="score", mode="max", restore_best=True),
            Stage(0, 2, 1e-3),
        ]
        trainer = make_trainer(
            max_epochs=8,
            callbacks=[GradualUnfreezing(plan), *callbacks],
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        )
        train, valid = tiny_loaders()
        trainer.fit(module, train, valid, ckpt_path=ckpt_path)
        return module, trainer

    full, _ = fit([])
    with pytest.raises(RuntimeError, match="simulated crash"):
        # Saved at the end of each epoch's validation, before on_train_epoch_end: the decision
        # must be taken there already.
        checkpoint = ModelCheckpoint(
            dirpath=tmp_path, save_last=True, save_on_train_epoch_end=False
        )
        fit([checkpoint, CrashAtBatch(crash_at)])
    resumed, trainer = fit([], ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.current_epoch == 6
    assert same(resumed.state_dict(), full.state_dict())


def test_restore_best_is_refused_on_a_sharded_model_and_monitors_are_named():
    from difflr.callbacks.plateau import check_monitors

    with pytest.raises(ValueError, match="restore_best is not supported under ModelParallel"):
        check_monitors([Stage(0, 2, 1e-3, restore_best=True)], None, sharded=True)
    check_monitors([Stage(0, 2, 1e-3, patience=1)], None, sharded=True)  # patience alone is fine
    with pytest.raises(ValueError, match=r"milestones\[1\] monitors 'valid_loss'"):
        plan = Stage.from_milestones({1: {"freeze_to": 0, "duration": 2, "lrs": [1e-3] * 3}})
        check_monitors([dataclasses.replace(plan[0], patience=1)], ["train_loss"])


# ------------------------------------------------------------------ review findings (issue 28)
def test_mode_follows_the_monitors_name_as_in_fastai():
    assert Stage(-1, 4, 1e-3, patience=1).mode == "min"  # valid_loss
    assert Stage(-1, 4, 1e-3, patience=1, monitor="accuracy").mode == "max"
    assert Stage(-1, 4, 1e-3, patience=1, monitor="error_rate").mode == "min"
    assert Stage(-1, 4, 1e-3, patience=1, monitor="accuracy", mode="min").mode == "min"


@pytest.mark.parametrize(
    "kwargs",
    [{"monitor": "acuracy"}, {"mode": "max"}, {"min_delta": 0.1}, {"anneal_epochs": 2}],
)
def test_a_plateau_argument_on_a_stage_that_watches_nothing_is_refused(tmp_path, kwargs):
    learn = make_learner(tmp_path)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    plan = [Stage(-1, 1, 1e-3), Stage(0, 1, 1e-3, **kwargs)]
    with pytest.raises(ValueError, match=r"stages\[1\]: .* only matter.*patience=N"):
        learn.fit_stages(plan)
    with pytest.raises(ValueError, match=r"stages\[1\]: .* only matter.*patience=N"):
        GradualUnfreezing(plan)
    for key, value in learn.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # They matter once the stage watches: from the plan (restore_best for all) too.
    assert Stage(0, 1, 1e-3, restore_best=True, **kwargs).watches


def test_preview_names_a_found_lr_or_plateau_epoch_of_the_wrong_kind(tmp_path):
    learn = make_learner(tmp_path)
    found = [Stage(-1, 3, "valley"), Stage(0, 3, 1e-3, patience=1)]
    for bad in (-1e-2, float("nan")):
        with pytest.raises(ValueError, match=r"found_lrs\[0\] must be a finite number > 0"):
            learn.preview_stages(found, found_lrs={0: bad})
    with pytest.raises(TypeError, match=r"found_lrs\[0\] must be a number"):
        learn.preview_stages(found, found_lrs={0: slice(1e-4, 1e-3)})
    with pytest.raises(TypeError, match=r"plateau_at\[1\] must be an int"):
        learn.preview_stages(found, plateau_at={1: 1.0})


def test_an_lr_finder_among_a_learners_callbacks_is_refused_before_anything_changes(tmp_path):
    learn = make_learner(tmp_path, callbacks=[LRFinder()])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    frozen = list(learn.frozen)
    with pytest.raises(ValueError, match="LRFinder is a callback for your own Trainer"):
        learn.fit_stages([Stage(-1, 1, 1e-3), Stage(0, 1, slice(1e-5, 1e-3))])
    assert learn.frozen == frozen
    for key, value in learn.model.state_dict().items():
        assert torch.equal(value, before[key]), key
