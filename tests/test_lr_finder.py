"""The LR range test on a Learner: the sweep's schedule, its stop rule and its exact restore."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from difflr import minimum, steep, valley
from difflr.policy.suggestions import make_suggestions
from tests.helpers import make_learner, make_model, three_groups


def _state(learn):
    """Everything lr_find must put back, as comparable plain data."""
    opt = learn.opt.state_dict()
    return {
        "tensors": {k: v.clone() for k, v in learn.module.state_dict().items()},
        "opt_state": {
            k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()}
            for k, v in opt["state"].items()
        },
        "opt_groups": [
            {k: v for k, v in pg.items() if k != "params"} for pg in opt["param_groups"]
        ],
        "flags": [p.requires_grad for p in learn.model.parameters()],
        "frozen": learn.frozen,
        "training": [m.training for m in learn.model.modules()],
        "torch_rng": torch.get_rng_state(),
        "np_rng": np.random.get_state()[1].copy(),
        "py_rng": random.getstate(),
    }


def _assert_same(before, after):
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
    assert before["opt_state"].keys() == after["opt_state"].keys()
    for key, state in before["opt_state"].items():
        for name, value in state.items():
            other = after["opt_state"][key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert before["opt_groups"] == after["opt_groups"]
    for key in ("flags", "frozen", "training", "py_rng"):
        assert before[key] == after[key], key
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["np_rng"], after["np_rng"])


def _trained(tmp_path, **kwargs):
    learn = make_learner(tmp_path, **kwargs)
    learn.fit_one_cycle(1, 1e-2)  # so the optimizer has state and the BatchNorm stats moved
    learn.freeze()
    learn.fit(1, 1e-3)
    learn.model.eval()
    return learn


def test_sweep_lrs_follow_the_formula_for_every_group(tmp_path):
    learn = make_learner(tmp_path)
    learn.lr_find(
        start_lr=[1e-7, 1e-6, 1e-5],
        end_lr=[1.0, 10.0, 100.0],
        num_it=30,
        stop_div=False,
        show_plot=False,
    )
    i = np.arange(30)[:, None]
    start, end = np.array([1e-7, 1e-6, 1e-5]), np.array([1.0, 10.0, 100.0])
    np.testing.assert_allclose(learn.recorder.lrs, start * (end / start) ** (i / 30), rtol=1e-12)
    assert learn.recorder.losses.shape == (30,)


def test_slice_bounds_keep_the_discriminative_ratio_at_every_step(tmp_path):
    learn = make_learner(tmp_path)
    learn.lr_find(
        start_lr=slice(1e-8, 1e-6),
        end_lr=slice(1e-1, 10.0),
        num_it=20,
        stop_div=False,
        show_plot=False,
    )
    ratios = learn.recorder.lrs / learn.recorder.lrs[:, -1:]
    np.testing.assert_allclose(ratios, np.tile([0.01, 0.1, 1.0], (20, 1)), rtol=1e-9)


def test_sweep_loops_over_the_loader_as_often_as_needed(tmp_path):
    learn = make_learner(tmp_path)  # 6 batches per epoch
    learn.lr_find(num_it=20, stop_div=False, show_plot=False)
    assert learn.recorder.lrs.shape == (20, 3)


def test_a_normal_sweep_restores_everything_bit_for_bit(tmp_path):
    learn = _trained(tmp_path)
    before = _state(learn)
    result = learn.lr_find(num_it=30, show_plot=False)
    _assert_same(before, _state(learn))
    assert 1e-7 <= result.valley <= 10


def test_a_diverging_sweep_stops_early_and_restores(tmp_path):
    learn = _trained(tmp_path)
    before = _state(learn)
    learn.lr_find(start_lr=1e-3, end_lr=1e6, num_it=100, show_plot=False)
    assert len(learn.recorder.losses) < 100
    _assert_same(before, _state(learn))


class _Exploding(nn.Module):
    """Raises in forward after ``after`` calls: a sweep that fails mid-way."""

    def __init__(self, after: int, exc: type[BaseException]):
        super().__init__()
        self.net, self.calls, self.after, self.exc = make_model(), 0, after, exc

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise self.exc("boom")
        return self.net(x)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_sweep_that_raises_or_is_interrupted_restores(tmp_path, exc):
    model = _Exploding(after=1000, exc=exc)
    learn = make_learner(tmp_path, model, splitter=lambda m: three_groups(m.net))
    learn.fit(1, 1e-2)
    before = _state(learn)
    model.calls, model.after = 0, 7
    with pytest.raises(exc):
        learn.lr_find(num_it=50, show_plot=False)
    _assert_same(before, _state(learn))


def test_a_disk_snapshot_restores_and_removes_its_file(tmp_path):
    learn = _trained(tmp_path)
    before = _state(learn)
    learn.lr_find(num_it=20, show_plot=False, snapshot="disk")
    _assert_same(before, _state(learn))
    assert list(tmp_path.glob("*.pt")) == []


def test_a_sweep_from_a_frozen_learner_trains_only_the_head_and_stays_frozen(tmp_path):
    learn = make_learner(tmp_path, train_bn=False)
    learn.freeze()
    learn.lr_find(num_it=20, show_plot=False)
    assert learn.frozen == [True, True, False]
    assert [p.requires_grad for p in learn.model.parameters()] == [False] * 6 + [True] * 2
    assert learn.recorder.trainable == [[False, False, True]]


def test_suggestions_come_from_the_recorded_curve(tmp_path):
    learn = make_learner(tmp_path)
    result = learn.lr_find(num_it=50, show_plot=False, suggest_funcs=(valley, steep, minimum))
    assert result._fields == ("valley", "steep", "minimum")
    lrs, losses = learn.recorder.lrs[:, -1], learn.recorder.losses
    expected, _ = make_suggestions((valley, steep, minimum), lrs, losses, skip_start=5)
    assert tuple(result) == pytest.approx(tuple(expected))


def test_plot_lr_find_draws_the_recorded_curve_and_marks_suggestions(tmp_path):
    learn = make_learner(tmp_path)
    result = learn.lr_find(num_it=40, stop_div=False, show_plot=False)
    fig = learn.recorder.plot_lr_find()
    curve, marker = fig.axes[0].get_lines()[:2]
    np.testing.assert_allclose(curve.get_xdata(), learn.recorder.lrs[:-5, -1])
    np.testing.assert_allclose(curve.get_ydata(), learn.recorder.losses[:-5])
    assert marker.get_xdata()[0] == pytest.approx(result.valley)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"start_lr": 1.0, "end_lr": 1e-3}, "start_lr must be below end_lr"),
        ({"start_lr": 0.0}, "start_lr is 0.0"),
        ({"end_lr": -1.0}, "end_lr is -1.0"),
        ({"num_it": 1}, "num_it must be an int >= 2"),
        ({"start_lr": [1e-7, 1e-7]}, "start_lr has 2 values but the model has 3"),
        ({"snapshot": "gpu"}, "snapshot must be 'memory' or 'disk'"),
    ],
)
def test_bad_sweep_arguments_are_refused_before_anything_runs(tmp_path, kwargs, words):
    learn = make_learner(tmp_path)
    before = _state(learn)
    with pytest.raises(ValueError, match=words):
        learn.lr_find(show_plot=False, **kwargs)
    _assert_same(before, _state(learn))
    assert learn.trainer is None


def test_the_divergence_stop_tests_whole_optimizer_steps_and_the_curve_shows_why(tmp_path):
    # With 4 micro-batches per step, the stop is tested on each step's mean loss, smoothed as the
    # recorder smooths it: the sweep ends on a step boundary, at a point of the recorded curve
    # that is over 4x the best one.
    learn = make_learner(tmp_path, accumulate_grad_batches=4)
    learn.lr_find(start_lr=1e-3, end_lr=1e6, num_it=40, show_plot=False, suggest_funcs=None)
    losses = learn.recorder.losses
    assert len(losses) == len(learn.recorder.lrs) < 40
    assert losses[-1] > 4 * np.nanmin(losses[:-1]) or not np.isfinite(losses[-1])


def test_lr_find_without_suggestion_functions_records_plots_and_returns_none(tmp_path):
    learn = make_learner(tmp_path)
    assert learn.lr_find(num_it=20, show_plot=False, suggest_funcs=None) is None
    assert len(learn.recorder.lrs) == 20
    assert learn.recorder.plot_lr_find().axes[0].get_lines()


def test_a_loader_that_yields_nothing_is_refused_instead_of_looping_forever(tmp_path):
    class Empty(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

    learn = make_learner(tmp_path, data=(torch.utils.data.DataLoader(Empty(), batch_size=4), None))
    with pytest.raises(ValueError, match="yielded no batch"):
        learn.lr_find(num_it=10, show_plot=False)
    with pytest.raises(ValueError, match="limit_train_batches=0 leaves the sweep no batch"):
        make_learner(tmp_path, limit_train_batches=0).lr_find(show_plot=False)


KILLED_SWEEP = """
    import os, signal, sys
    import torch
    from torch.utils.data import DataLoader, Dataset
    from tests.helpers import make_learner, make_loaders

    class KillAt(Dataset):
        def __init__(self, items):
            self.items, self.seen = items, 0
        def __len__(self):
            return len(self.items)
        def __getitem__(self, i):
            self.seen += 1
            if self.seen == 40:  # mid-sweep: the snapshot is on disk
                names = sorted(p.name for p in os.scandir(sys.argv[1]))
                print("during the sweep:", names, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return self.items[i]

    train, valid = make_loaders()
    learn = make_learner(sys.argv[1], data=(DataLoader(KillAt(train.dataset), batch_size=16),
                                            valid))
    learn.lr_find(num_it=20, show_plot=False, snapshot="disk")
    """


def test_a_disk_snapshot_has_no_name_so_a_kill_leaves_nothing_and_none_can_alter_it(tmp_path):
    from tests.helpers import run_script

    result = run_script(KILLED_SWEEP, tmp_path)
    assert result.returncode == -9, result.stdout + result.stderr
    assert "during the sweep: []" in result.stdout  # no file another process could edit
    assert list(tmp_path.iterdir()) == []  # and none left by the SIGKILL
