"""Stage plans: the original milestone dict, fit_stages, and the GradualUnfreezing callback."""

from __future__ import annotations

from types import SimpleNamespace
from typing import get_args

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from difflr import GradualUnfreezing, Learner, Recorder, Stage
from difflr.policy.schedules import one_cycle_lr, one_cycle_mom, steps_per_epoch
from difflr.policy.stages import ScheduleKind, fine_tune_stages
from tests import helpers
from tests.helpers import Crash, make_loaders

# The original example's plan for a ResNet-18 in 6 groups (ORIGINAL_EXAMPLE.md), verbatim.
MILESTONES = {
    1: {"freeze_to": -1, "duration": 1, "pct_start": 0.3, "lrs": [0.0, 0.0, 0.0, 0.0, 0.0, 1e-3]},
    2: {"freeze_to": -2, "duration": 1, "pct_start": 0.3, "lrs": [0.0, 0.0, 0.0, 0.0, 5e-4, 5e-4]},
    3: {"freeze_to": -3, "duration": 1, "pct_start": 0.3, "lrs": [0.0, 0.0, 0.0, 5e-5, 1e-4, 1e-4]},
    4: {
        "freeze_to": -4,
        "duration": 1,
        "pct_start": 0.3,
        "lrs": [0.0, 0.0, 1e-5, 1e-5, 5e-5, 5e-5],
    },
    5: {
        "freeze_to": -5,
        "duration": 1,
        "pct_start": 0.3,
        "lrs": [0.0, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5],
    },
    6: {"freeze_to": 0, "duration": 1, "pct_start": 0.3, "lrs": [1e-6] * 6},
}


def six_group_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 12),
        nn.ReLU(),
        nn.Linear(12, 12),
        nn.ReLU(),
        nn.Linear(12, 12),
        nn.ReLU(),
        nn.Linear(12, 12),
        nn.ReLU(),
        nn.Linear(12, 3),
    )


def six_groups(model: nn.Module) -> list[nn.Module]:
    net = model.net if hasattr(model, "net") else model
    return [net[0:3], net[3:5], net[5:7], net[7:9], net[9:11], net[11]]


def make_learner(tmp_path, **kwargs) -> Learner:
    return helpers.make_learner(tmp_path, six_group_model(), splitter=six_groups, **kwargs)


def test_from_milestones_reads_the_original_plan():
    plan = Stage.from_milestones(MILESTONES)
    assert [s.freeze_to for s in plan] == [-1, -2, -3, -4, -5, 0]
    assert [s.epochs for s in plan] == [1] * 6
    assert all(s.pct_start == 0.3 for s in plan)
    assert plan[2].lrs(6) == [0.0, 0.0, 0.0, 5e-5, 1e-4, 1e-4]
    # torch's OneCycleLR defaults: div_factor 25, final_div_factor 1e4 of the *initial* LR.
    assert plan[0].div == 25.0 and plan[0].div_final == 25.0 * 1e4


def test_from_milestones_maps_the_one_cycle_knobs():
    (stage,) = Stage.from_milestones(
        {
            1: {
                "freeze_to": 0,
                "duration": 2,
                "lrs": [1e-3],
                "div_factor": 10.0,
                "final_div_factor": 100.0,
                "base_momentum": 0.8,
                "max_momentum": 0.9,
            }
        }
    )
    assert (stage.div, stage.div_final, stage.moms) == (10.0, 1000.0, (0.9, 0.8, 0.9))


@pytest.mark.parametrize(
    ("milestones", "words"),
    [
        (
            {1: {**MILESTONES[1]}, 3: {**MILESTONES[2]}},
            r"milestones\[3\] starts at epoch 3.*epochs 2\.\.2",
        ),
        ({2: {**MILESTONES[1]}}, r"milestones\[2\] starts at epoch 2.*first milestone is epoch 1"),
        ({1: {**MILESTONES[1], "duration": 2}, 2: MILESTONES[2]}, r"milestones\[2\].*overlap"),
        ({1: {**MILESTONES[1], "lr": 1e-3}}, r"milestones\[1\] has unknown key\(s\) \['lr'\]"),
        ({1: {"freeze_to": -1, "duration": 1}}, r"milestones\[1\] lacks key\(s\) \['lrs'\]"),
        (
            {1: MILESTONES[1], 2: {**MILESTONES[2], "lrs": [1e-3] * 5}},
            r"milestones\[2\]\['lrs'\] has 5 values but earlier milestones have 6",
        ),
        (
            {1: {**MILESTONES[1], "pct_start": 1.5}},
            r"milestones\[1\]: pct_start must be in \(0, 1\)",
        ),
        ({}, "non-empty dict"),
    ],
)
def test_malformed_milestones_are_refused_naming_the_key(milestones, words):
    with pytest.raises(ValueError, match=words):
        Stage.from_milestones(milestones)


def test_a_plan_of_the_wrong_length_for_the_model_is_refused_before_training(tmp_path, loaders):
    learn = helpers.make_learner(
        tmp_path, six_group_model(), loaders, splitter=lambda m: [m[:5], m[5:]]
    )
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(
        ValueError, match=r"milestones\[1\]\['lrs'\] has 6 values but the model has 2"
    ):
        learn.fit_stages(Stage.from_milestones(MILESTONES))
    with pytest.raises(ValueError, match=r"freeze_to\(-5\) is out of range"):
        learn.fit_stages([Stage(-5, 1, 1e-3)])
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
    assert learn.frozen == [False, False] and learn.trainer is None


def test_a_dict_is_pointed_to_from_milestones(tmp_path):
    learn = make_learner(tmp_path)
    with pytest.raises(TypeError, match=r"Stage\.from_milestones"):
        learn.fit_stages(MILESTONES)


def closed_form(plan, steps_per_epoch, moms=(0.95, 0.85, 0.95)):
    lrs, mom_values = [], []
    for stage in plan:
        n = stage.epochs * steps_per_epoch
        lr_sched = one_cycle_lr(np.array(stage.lrs(6)), stage.pct_start, stage.div, stage.div_final)
        mom_sched = one_cycle_mom(stage.moms or moms, stage.pct_start)
        lrs += [lr_sched(i / n) for i in range(n)]
        mom_values += [[mom_sched(i / n)] * 6 for i in range(n)]
    return np.array(lrs), np.array(mom_values)


def test_fit_stages_runs_the_original_plan_step_by_step(tmp_path):
    learn = make_learner(tmp_path, train_bn=False)
    plan = Stage.from_milestones(MILESTONES)
    snapshots = []

    class Snap(Callback):
        def on_train_start(self, trainer, pl_module):
            snapshots.append([p.detach().clone() for p in learn.model.parameters()])

    learn.callbacks.append(Snap())
    learn.fit_stages(plan)
    snapshots.append([p.detach().clone() for p in learn.model.parameters()])
    rec, steps = learn.recorder, 6
    assert rec.boundaries == [0, 6, 12, 18, 24, 30]
    assert rec.trainable == [[i >= 6 - k for i in range(6)] for k in (1, 2, 3, 4, 5)] + [[True] * 6]
    lrs, moms = closed_form(plan, steps)
    np.testing.assert_allclose(rec.lrs, lrs, rtol=1e-12)
    np.testing.assert_allclose(rec.moms, moms, rtol=1e-12)
    # Per stage: frozen groups did not move, trainable ones did.
    params_of_group = [
        [i for i, p in enumerate(learn.model.parameters()) if any(p is q for q in g.params)]
        for g in learn.splits
    ]
    for stage_index, trainable in enumerate(rec.trainable):
        before, after = snapshots[stage_index], snapshots[stage_index + 1]
        for group, flag in enumerate(trainable):
            moved = any(not torch.equal(before[i], after[i]) for i in params_of_group[group])
            assert moved == flag, (stage_index, group)


class LitSix(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = six_group_model()

    def model_splits(self):
        return six_groups(self)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def plain_trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = {"max_epochs": 6, "enable_checkpointing": False, **kwargs}
    return pl.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **options,
    )


def test_the_callback_on_a_plain_trainer_matches_fit_stages(tmp_path):
    plan = Stage.from_milestones(MILESTONES)
    # LitSix's own torch.optim.AdamW, so that the weights can be compared bit for bit (the
    # Learner's default runs AdamW fused, to float tolerance of it: tests/test_optim.py).
    learn = make_learner(tmp_path, opt_func=torch.optim.AdamW)
    learn.fit_stages(plan)

    module, recorder = LitSix(), Recorder(log_hypers=False)
    trainer = plain_trainer(tmp_path, [GradualUnfreezing(plan), recorder])
    trainer.fit(module, train_dataloaders=make_loaders()[0])
    np.testing.assert_allclose(recorder.lrs, learn.recorder.lrs, rtol=1e-12)
    np.testing.assert_allclose(recorder.moms, learn.recorder.moms, rtol=1e-12)
    names = [pg["name"] for pg in trainer.optimizers[0].param_groups]
    assert names == [pg["name"] for pg in learn.opt.param_groups]
    for a, b in zip(module.net.parameters(), learn.model.parameters()):
        assert torch.equal(a, b)


def test_the_callback_resumes_mid_plan_to_the_same_weights(tmp_path):
    plan = Stage.from_milestones(MILESTONES)
    full = LitSix()
    plain_trainer(tmp_path / "a", [GradualUnfreezing(plan)]).fit(full, make_loaders()[0])

    crashed = LitSix()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crash = Crash(2, 3)  # the middle of stage 3
        plain_trainer(
            tmp_path / "b", [GradualUnfreezing(plan), ckpt, crash], enable_checkpointing=True
        ).fit(crashed, make_loaders()[0])
    resumed = LitSix()
    callback = GradualUnfreezing(plan)
    plain_trainer(tmp_path / "c", [callback]).fit(
        resumed, make_loaders()[0], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert callback.stage == 5
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_the_callback_refuses_to_start_under_several_processes():
    callback = GradualUnfreezing([Stage(-1, 1, 1e-3), Stage(0, 1, 1e-3)])
    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace())
    with pytest.raises(ValueError, match=r"fit_stages\(stages\)"):
        callback.setup(trainer, LitSix(), "fit")


def test_the_callback_refuses_a_user_lr_scheduler(tmp_path):
    class WithScheduler(LitSix):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters())
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    trainer = plain_trainer(tmp_path, [GradualUnfreezing([Stage(0, 1, 1e-3)])], max_epochs=1)
    with pytest.raises(ValueError, match="no LR scheduler"):
        trainer.fit(WithScheduler(), make_loaders()[0])


def test_lr_monitor_shows_group_names(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    monitor, recorder = LearningRateMonitor(logging_interval="step"), Recorder(log_hypers=False)
    plan = [Stage(-1, 1, 1e-3), Stage(0, 1, slice(1e-5, 1e-3))]
    trainer = pl.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[GradualUnfreezing(plan), recorder, monitor],
    )
    trainer.fit(LitSix(), make_loaders()[0])
    assert "lr-AdamW/0.sequential" in monitor.lrs and "lr-AdamW/5.linear" in monitor.lrs
    # The monitor reads at batch start and sees the very values each step uses: no lag.
    np.testing.assert_allclose(monitor.lrs["lr-AdamW/5.linear"], recorder.lrs[:, 5])
    np.testing.assert_allclose(monitor.lrs["lr-AdamW/0.sequential"], recorder.lrs[:, 0])


@pytest.mark.parametrize(
    ("preview", "fit"),
    [
        (
            lambda L: L.preview_one_cycle(2, slice(1e-5, 1e-3), pct_start=0.4),
            lambda L: L.fit_one_cycle(2, slice(1e-5, 1e-3), pct_start=0.4),
        ),
        (lambda L: L.preview_fine_tune(2, base_lr=1e-3), lambda L: L.fine_tune(2, base_lr=1e-3)),
        (
            lambda L: L.preview_stages(Stage.from_milestones(MILESTONES)),
            lambda L: L.fit_stages(Stage.from_milestones(MILESTONES)),
        ),
        (
            lambda L: L.preview_stages(Stage(None, 2, 1e-3, schedule="flat_cos")),
            lambda L: L.fit_flat_cos(2, 1e-3),
        ),
        (
            lambda L: L.preview_stages(Stage(None, 1, slice(1e-3), schedule="constant")),
            lambda L: L.fit(1, slice(1e-3)),
        ),
    ],
)
def test_a_preview_equals_the_recorded_schedule_of_the_same_fit(tmp_path, preview, fit):
    learn = make_learner(tmp_path, accumulate_grad_batches=2)
    planned = preview(learn)
    fit(learn)
    np.testing.assert_allclose(planned.lrs, learn.recorder.lrs, rtol=1e-12)
    np.testing.assert_allclose(planned.moms, learn.recorder.moms, rtol=1e-12)
    assert planned.boundaries == learn.recorder.boundaries
    assert planned.names == learn.recorder.names


# ------------------------------------------------------------------------------------------------
# Stage: the one description of a training segment
# ------------------------------------------------------------------------------------------------


def test_each_schedule_kind_has_its_own_default_pct_start():
    assert Stage(0, 1, 1e-3).pct_start == 0.25
    assert Stage(0, 1, 1e-3, schedule="flat_cos").pct_start == 0.75
    assert Stage(0, 1, 1e-3, schedule="flat_cos", pct_start=0.5).pct_start == 0.5


def test_every_schedule_kind_is_a_stage_schedule_with_its_recorded_knobs():
    # The kinds a type checker knows are the kinds a Stage accepts, and each describes itself.
    assert get_args(ScheduleKind) == ("one_cycle", "flat_cos", "constant")
    described = {
        kind: Stage(0, 1, 1e-3, schedule=kind).describe(1) for kind in get_args(ScheduleKind)
    }
    assert {k: (d["pct_start"], d["div"], d["div_final"]) for k, d in described.items()} == {
        "one_cycle": (0.25, 25.0, 1e5),
        "flat_cos": (0.75, None, 1e5),
        "constant": (None, None, None),
    }
    assert [d["moms"] is not None for d in described.values()] == [True, False, False]


def test_a_stage_schedules_in_closed_form():
    one_cycle, flat, constant = (
        Stage(0, 1, [1e-4, 1e-3], pct_start=0.5, div=10.0, div_final=100.0),
        Stage(0, 1, [1e-4, 1e-3], pct_start=0.5, div_final=100.0, schedule="flat_cos"),
        Stage(0, 1, [1e-4, 1e-3], schedule="constant"),
    )
    np.testing.assert_allclose(one_cycle.lr_schedule(2)(0.0), [1e-5, 1e-4])
    np.testing.assert_allclose(one_cycle.lr_schedule(2)(0.5), [1e-4, 1e-3])
    np.testing.assert_allclose(one_cycle.lr_schedule(2)(1.0), [1e-6, 1e-5])
    np.testing.assert_allclose(flat.lr_schedule(2)(0.25), [1e-4, 1e-3])
    np.testing.assert_allclose(flat.lr_schedule(2)(1.0), [1e-6, 1e-5])
    np.testing.assert_allclose(constant.lr_schedule(2)(0.7), [1e-4, 1e-3])
    assert one_cycle.mom_schedule((0.9, 0.8, 0.9))(0.5) == pytest.approx(0.8)
    assert flat.mom_schedule((0.9, 0.8, 0.9)) is None and constant.mom_schedule((0.9,) * 3) is None


def test_a_stage_without_lr_max_takes_the_default_it_is_given():
    stage = Stage(None, 2, pct_start=0.3)
    assert stage.lrs(3, default=slice(1e-4, 1e-2)) == pytest.approx([1e-4, 1e-3, 1e-2])
    with pytest.raises(ValueError, match="no lr_max"):
        stage.lrs(3)
    assert stage.n_steps(steps_per_epoch=5) == 10


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"freeze_to": 1.0}, TypeError, "freeze_to must be an int or None"),
        ({"epochs": 0}, ValueError, r"epochs must be an int >= 1 \(a number of epochs\), got 0"),
        ({"epochs": "2"}, TypeError, "epochs must be an int"),
        ({"schedule": "cosine"}, ValueError, "schedule must be 'one_cycle', 'flat_cos' or"),
        ({"div": -1}, ValueError, "div must be a finite number > 0, got -1"),
        ({"moms": (0.9, 0.8)}, ValueError, "moms must be three values"),
        ({"wd": "none"}, TypeError, "wd must be a number"),
        ({"pct_start": 1}, ValueError, r"pct_start must be in \(0, 1\)"),
    ],
)
def test_a_stage_refuses_bad_fields_with_the_vocabulary_of_every_entry_point(kwargs, exc, words):
    fields = {"freeze_to": 0, "epochs": 1, "lr_max": 1e-3, **kwargs}
    with pytest.raises(exc, match=words):
        Stage(**fields)
    with pytest.raises(exc, match=f"milestones\\[2\\]: {words}"):
        Stage(**fields, name="milestones[2]")


def test_fine_tune_stages_is_fastais_recipe():
    frozen, unfrozen = fine_tune_stages(3, base_lr=4e-3, freeze_epochs=2, lr_mult=10, wd=0.1)
    assert (frozen.freeze_to, frozen.epochs, frozen.pct_start, frozen.wd) == (-1, 2, 0.99, 0.1)
    assert frozen.lrs(3) == pytest.approx([4e-4, 4e-4, 4e-3])
    assert (unfrozen.freeze_to, unfrozen.epochs, unfrozen.pct_start, unfrozen.div) == (0, 3, 0.3, 5)
    assert unfrozen.lrs(3) == pytest.approx([2e-4, 2e-4 * 10**0.5, 2e-3])
    assert [s.freeze_to for s in fine_tune_stages(3, freeze_epochs=0)] == [0]
    with pytest.raises(TypeError, match="unexpected argument"):
        fine_tune_stages(3, pct=0.2)
    with pytest.raises(TypeError, match="freeze_epochs must be an int"):
        fine_tune_stages(3, freeze_epochs=1.0)


def test_steps_per_epoch_counts_a_last_partial_accumulation():
    assert [steps_per_epoch(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert steps_per_epoch(0, 2) == 1


def test_the_callback_keeps_the_pattern_through_a_stage_without_freeze_to(tmp_path):
    plan = [Stage(-1, 1, 1e-3), Stage(None, 1, 1e-3, schedule="constant")]
    module = LitSix()
    recorder = Recorder(log_hypers=False)
    callbacks = [GradualUnfreezing(plan, splitter=six_groups), recorder]
    plain_trainer(tmp_path, callbacks, max_epochs=2).fit(module, make_loaders()[0])
    trains = [any(p.requires_grad for p in group.parameters()) for group in six_groups(module)]
    assert trains == [True] + [False] * 4 + [True]  # the stem's BatchNorm trains (train_bn)
    assert np.allclose(recorder.lrs[len(recorder.lrs) // 2 :], 1e-3)
