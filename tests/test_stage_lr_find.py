"""An LR found per stage: ``Stage(lr_max="valley")`` runs the range test when the stage starts."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from difflr import GradualUnfreezing, Stage, expand_lrs, steep
from difflr.training import stage_lr
from difflr.training.checkpoints import FitRecord
from tests.helpers import Crash, make_learner, make_loaders

SWEEP = {"num_it": 20}


def shuffled_loaders() -> tuple[DataLoader, DataLoader]:
    """make_loaders' data, the training set shuffled by a generator of its own (which a sweep
    draws from, and must put back)."""
    train, valid = make_loaders()
    return (
        DataLoader(
            train.dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1)
        ),
        valid,
    )


def plan(second: object = "valley", **kwargs: object) -> list[Stage]:
    """The head alone at a given LR, then everything at the LR found (or ``second``)."""
    return [Stage(-1, 1, 1e-2), Stage(0, 2, second, pct_start=0.5, **kwargs)]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def count_sweeps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = stage_lr.lr_find

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stage_lr, "lr_find", counted)
    return calls


# ------------------------------------------------------------------------------------ the stage
def test_a_found_lr_stage_becomes_a_given_one_with_the_ratio_of_lr_mult():
    stage = Stage(0, 2, "valley", lr_mult=100, lr_find_kwargs={"num_it": 50}, name="s1")
    assert stage.finds_lr and stage.suggestion.__name__ == "valley"
    given = stage.with_found_lr(2e-3)
    assert given == Stage(0, 2, slice(2e-3 / 100, 2e-3), name="s1")
    assert not given.finds_lr
    assert Stage(0, 2, steep).with_found_lr(1e-3).lr_max == 1e-3  # no lr_mult: every group
    assert stage.sweep_bounds() == (slice(1e-7 / 100, 1e-7), slice(10.0 / 100, 10.0))
    assert Stage(0, 1, "minimum").sweep_bounds() == (1e-7, 10.0)
    # What a checkpoint records of it: how the LR is found, not a number.
    described = stage.describe(3)
    assert described["lrs"] is None
    assert described["lr_find"] == {"suggestion": "valley", "lr_mult": 100.0, "num_it": 50}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"lr_max": "valy"},
            r"'valy' is not a suggestion.*\['minimum', 'slide', 'steep', 'valley'\]",
        ),
        ({"lr_max": 1e-3, "lr_mult": 10}, r"lr_mult=10 .* found .*pass lr_max=slice\(lo, hi\)"),
        ({"lr_max": None, "lr_find_kwargs": {"num_it": 9}}, r"lr_find_kwargs=.*lr_max=None"),
        ({"lr_max": "valley", "lr_mult": 0.5}, r"lr_mult must be .* >= 1.*got 0.5"),
        ({"lr_max": "valley", "lr_find_kwargs": {"show_plot": True}}, r"unknown key.*show_plot"),
        ({"lr_max": "valley", "lr_find_kwargs": {"start_lr": 1.0, "end_lr": 0.1}}, r"below"),
        ({"lr_max": "valley", "lr_find_kwargs": {"num_it": 1}}, r"num_it"),
    ],
)
def test_a_stage_that_cannot_find_its_lr_is_refused_when_made(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        Stage(0, 1, name="stage 2", **kwargs)
    assert str(error.value).startswith("stage 2: ")


def test_a_sweep_that_suggests_no_lr_names_the_fix():
    with pytest.raises(ValueError, match=r"suggested lr=nan.*num_it"):
        Stage(0, 1, "valley").with_found_lr(math.nan)
    with pytest.raises(ValueError, match="found when it starts"):
        Stage(0, 1, "valley").lrs(3)


# ------------------------------------------------------------------------------------ fitting
def test_the_found_lr_is_what_lr_find_returns_on_the_stages_frozen_pattern(tmp_path):
    learn = make_learner(tmp_path / "plan")
    learn.fit_stages(plan(lr_mult=10, lr_find_kwargs=SWEEP))
    (found,) = learn.recorder.stage_lrs.values()
    assert list(learn.recorder.stage_lrs) == [1]

    by_hand = make_learner(tmp_path / "hand")  # the same model, data and seed
    by_hand.fit_stages(plan()[:1])
    by_hand.unfreeze()
    suggested = by_hand.lr_find(
        start_lr=slice(1e-8, 1e-7), end_lr=slice(1.0, 10.0), num_it=20, show_plot=False
    )
    assert found == suggested.valley
    sweep = learn.recorder.lr_finds[1]
    np.testing.assert_array_equal(sweep["lrs"], by_hand.recorder.lrs)
    np.testing.assert_array_equal(sweep["losses"], by_hand.recorder.losses)
    # The stage trained at slice(s / 10, s): its peak (pct_start=0.5: step 6 of 12) per group.
    assert learn.recorder.boundaries == [0, 6]
    np.testing.assert_allclose(
        learn.recorder.lrs[6 + 6], expand_lrs(slice(found / 10, found), 3), rtol=1e-12
    )
    # The preview given the LR found shows the schedule the plan followed.
    preview = learn.preview_stages(
        plan(lr_mult=10, lr_find_kwargs=SWEEP), found_lrs=learn.recorder.stage_lrs
    )
    np.testing.assert_array_equal(preview.lrs, learn.recorder.lrs)
    assert preview.stand_ins == []


def test_a_plan_with_a_found_lr_equals_bit_for_bit_the_plan_given_that_lr(tmp_path):
    found_run = make_learner(tmp_path / "found", data=shuffled_loaders())
    found_run.fit_stages(plan(lr_find_kwargs=SWEEP))
    lr = found_run.recorder.stage_lrs[1]

    given_run = make_learner(tmp_path / "given", data=shuffled_loaders())
    given_run.fit_stages(plan(lr))
    assert_same_weights(found_run.model, given_run.model)
    for a, b in zip(found_run.opt.state.values(), given_run.opt.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in a)
    np.testing.assert_array_equal(found_run.recorder.lrs, given_run.recorder.lrs)
    np.testing.assert_array_equal(found_run.recorder.losses, given_run.recorder.losses)
    untimed = [
        [{k: v for k, v in row.items() if k != "time"} for row in run.recorder.values]
        for run in (found_run, given_run)
    ]
    assert untimed[0] == untimed[1]
    assert found_run.summary() == given_run.summary()  # the peak LRs include the found one


def test_a_resumed_plan_uses_the_recorded_lr_and_does_not_sweep(tmp_path, monkeypatch):
    full = make_learner(tmp_path / "full")
    full.fit_stages(plan(lr_mult=10, lr_find_kwargs=SWEEP))

    crashed = make_learner(tmp_path / "run", callbacks=[Crash(epoch=1, batch=2)])
    with pytest.raises(RuntimeError, match="simulated crash"):  # in stage 1's second epoch
        crashed.fit_stages(plan(lr_mult=10, lr_find_kwargs=SWEEP))

    sweeps = count_sweeps(monkeypatch)
    resumed = make_learner(tmp_path / "run")  # a fresh session
    with pytest.warns(UserWarning, match="re-created after a crash"):
        resumed.fit_stages(plan(lr_mult=10, lr_find_kwargs=SWEEP), ckpt_path="last")
    assert sweeps == []
    assert_same_weights(full.model, resumed.model)
    assert resumed.recorder.stage_lrs == full.recorder.stage_lrs  # the sweep came with the record
    np.testing.assert_array_equal(resumed.recorder.lrs, full.recorder.lrs)


def test_a_resume_whose_checkpoint_lacks_the_found_lr_is_refused_before_anything_changes(
    tmp_path,
):
    crashed = make_learner(tmp_path, callbacks=[Crash(epoch=1, batch=0)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit_stages(plan(lr_find_kwargs=SWEEP))
    file = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(file, weights_only=True)
    assert checkpoint["difflr"]["found_lrs"] == crashed.recorder.stage_lrs
    del checkpoint["difflr"]["found_lrs"]  # as written by a difflr without them
    checkpoint.pop("difflr.checksum")  # an editor that knows to drop the checksum
    torch.save(checkpoint, file)

    resumed = make_learner(tmp_path)
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    with (
        pytest.raises(ValueError, match=r"does not record the LR found .* stage\(s\) \[1\]"),
        pytest.warns(UserWarning, match="re-created after a crash"),
    ):
        resumed.fit_stages(plan(lr_find_kwargs=SWEEP), ckpt_path="last")
    assert all(torch.equal(before[k], v) for k, v in resumed.model.state_dict().items())
    assert resumed.frozen == [False, False, False] and len(resumed.recorder.lrs) == 0


def test_a_plan_whose_stage_cannot_sweep_is_refused_before_anything_changes(tmp_path):
    learn = make_learner(tmp_path, limit_train_batches=0)
    with pytest.raises(ValueError, match=r"stage\(s\) \[1\] find their LR.*limit_train_batches"):
        learn.fit_stages(plan())
    assert learn.frozen == [False, False, False]


def test_the_recorder_and_tensorboard_show_each_stages_sweep_and_lr(tmp_path):
    learn = make_learner(tmp_path, logger=True, checkpoint=False)
    learn.fit_stages([Stage(-1, 1, "valley", lr_find_kwargs=SWEEP), *plan("steep", lr_mult=10)])
    lrs = learn.recorder.stage_lrs
    assert list(lrs) == [0, 2]
    assert len(learn.recorder.lrs) == 6 * 4  # the plan's steps only, not the sweeps'
    figure = learn.recorder.plot_lr_find(stage=2)
    sweep = learn.recorder.lr_finds[2]
    (curve, *_) = figure.axes[0].get_lines()
    n = len(curve.get_xdata())
    np.testing.assert_array_equal(curve.get_xdata(), sweep["lrs"][:n, -1])
    assert sweep["points"]["steep"][0] == lrs[2]
    plt.close(figure)
    with pytest.raises(ValueError, match=r"no range test recorded for stage 1.*\[0, 2\]"):
        learn.recorder.plot_lr_find(stage=1)

    (folder,) = {events.parent for events in tmp_path.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(folder))  # a file per fit, one timeline
    accumulator.Reload()
    chosen = accumulator.Scalars("lr_find/stage_2")
    assert [p.step for p in chosen] == [12]  # where stage 2 starts on the timeline
    assert chosen[0].value == pytest.approx(lrs[2], rel=1e-6)
    losses = accumulator.Scalars("lr_find/stage_0_loss")
    assert [p.step for p in losses] == list(range(len(learn.recorder.lr_finds[0]["losses"])))


def test_a_preview_stands_in_the_learners_lr_for_an_lr_not_found_yet(tmp_path):
    learn = make_learner(tmp_path, lr=slice(1e-4, 1e-2))
    stages = plan(lr_mult=10)
    preview = learn.preview_stages(stages)
    assert preview.stand_ins == [1]
    head = expand_lrs(learn.lr, 3)[-1]  # the stand-in
    expected = learn.preview_stages(plan(slice(head / 10, head))).lrs
    np.testing.assert_array_equal(preview.lrs, expected)
    given = learn.preview_stages(stages, found_lrs={1: 3e-3})
    np.testing.assert_array_equal(given.lrs, learn.preview_stages(plan(slice(3e-3 / 10, 3e-3))).lrs)
    with pytest.raises(ValueError, match=r"found_lrs names stage\(s\) \[0\].*are \[1\]"):
        learn.preview_stages(stages, found_lrs={0: 1e-3})


def test_gradual_unfreezing_refuses_a_stage_that_finds_its_lr():
    with pytest.raises(ValueError, match=r"stage\(s\) \[1\] find their LR.*LRFinder\(milestones"):
        GradualUnfreezing(plan())


def test_a_found_lr_stage_trains_on_data_of_a_tiny_tensor_set(tmp_path):
    """The sweep runs on a loader shorter than its iterations (repeated as lr_find does)."""
    data = TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    learn = make_learner(tmp_path, data=(DataLoader(data, batch_size=4), None))
    learn.fit_stages([Stage(0, 1, "minimum", lr_find_kwargs={"num_it": 12, "stop_div": False})])
    (lr,) = learn.recorder.stage_lrs.values()
    assert learn.recorder.lrs[:, 2].max() <= lr * (1 + 1e-12)
    assert len(learn.recorder.lr_finds[0]["losses"]) == 12


@pytest.mark.parametrize("found", [{2: 1e-3}, {0: math.nan}, {0: 0.0}, {0: "1e-3"}, [1e-3]])
def test_a_fit_record_with_a_malformed_found_lr_is_refused(found):
    plan = {"stages": [{"epochs": 1}, {"epochs": 1}], "groups": []}
    assert FitRecord("a", "b", 1, plan, found_lrs={0: 1e-3, 1: 2e-3}).found_lrs[1] == 2e-3
    with pytest.raises(ValueError, match=r"found_lrs is .*expected \{stage: lr > 0\}"):
        FitRecord("a", "b", 1, plan, found_lrs=found)
