"""difflr.LRFinder: the range test as a callback in one's own Trainer, equal to Learner.lr_find."""

from __future__ import annotations

import lightning.pytorch as pl
import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from difflr import GradualUnfreezing, LRFinder, ParamScheduler, Recorder, Stage, minimum, steep
from difflr.optim.param_groups import GROUP_INDEX_KEY
from difflr.policy.schedules import one_cycle_lr
from tests.helpers import make_learner, make_loaders, make_model, make_trainer

matplotlib.use("Agg")


class Plain(pl.LightningModule):
    """A module of one's own: one param group, its LR in ``self.lr``."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = make_model()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _shuffled() -> DataLoader:
    train, _ = make_loaders()
    return DataLoader(train.dataset, batch_size=16, shuffle=True)


@pytest.mark.parametrize("stop", [4.0, None])
def test_the_suggestion_and_the_sweep_equal_learner_lr_find(tmp_path, stop):
    bounds = {"start_lr": slice(1e-6, 1e-4), "end_lr": slice(1.0, 1e4), "num_it": 40}
    funcs = (minimum, steep)
    learn = make_learner(tmp_path)
    expected = learn.lr_find(
        **bounds, stop_div=stop is not None, show_plot=False, suggest_funcs=funcs
    )

    finder = LRFinder(
        min_lr=bounds["start_lr"],
        max_lr=bounds["end_lr"],
        num_training_steps=bounds["num_it"],
        early_stop_threshold=stop,
        update_attr=False,
        suggest_funcs=funcs,
    )
    make_trainer(callbacks=[finder], max_steps=1).fit(
        make_learner(tmp_path).module, make_loaders()[0]
    )

    assert finder.suggestions == expected
    assert finder.suggestions._fields == ("minimum", "steep")
    np.testing.assert_array_equal(finder.lrs, learn.recorder.lrs)
    np.testing.assert_array_equal(finder.losses, learn.recorder.losses)
    assert finder.runs[0].points == learn.recorder.lr_find_points
    assert (len(finder.lrs) < 40) == (stop is not None)  # 1e4 at the head diverges


def _fit(tmp_path, callbacks, seed=1):
    module = make_learner(tmp_path).module
    torch.manual_seed(seed)
    make_trainer(callbacks=callbacks, max_epochs=2, limit_train_batches=3).fit(module, _shuffled())
    return module


def test_the_sweeps_leave_no_trace_on_the_fit(tmp_path):
    # At epoch 1 the optimizer has state, BatchNorm has moved and the loader shuffles from the
    # global RNG: a fit with two sweeps (its start and epoch 1) ends bit for bit where one
    # without them does.
    finder = LRFinder(num_training_steps=12, update_attr=False, milestones=[1])
    outer = Recorder()
    swept = _fit(tmp_path, [finder, outer])
    plain = _fit(tmp_path, [])
    assert [run.epoch for run in finder.runs] == [0, 1]
    for (name, a), b in zip(swept.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    opt_a = swept.configure_optimizers().state_dict()["state"]
    opt_b = plain.configure_optimizers().state_dict()["state"]
    for key, state in opt_a.items():
        for name, value in state.items():
            assert torch.equal(value, opt_b[key][name]), (key, name)
    assert len(outer.lrs) == 6  # the Trainer's own steps only


def test_linear_mode_follows_its_formula_in_every_group(tmp_path):
    start, end = np.array([1e-5, 1e-4, 1e-3]), np.array([1e-3, 1e-2, 1e-1])
    finder = LRFinder(
        min_lr=list(start),
        max_lr=list(end),
        num_training_steps=20,
        mode="Linear",
        early_stop_threshold=None,
        update_attr=False,
    )
    make_trainer(callbacks=[finder], max_steps=1).fit(
        make_learner(tmp_path).module, make_loaders()[0]
    )
    i = np.arange(20)[:, None]
    np.testing.assert_allclose(finder.lrs, start + (end - start) * i / 20, rtol=1e-12)
    lines = finder.plot(skip_end=0).axes[0].get_lines()
    np.testing.assert_array_equal(lines[0].get_xdata(), finder.lrs[:, -1])
    np.testing.assert_array_equal(lines[0].get_ydata(), finder.losses)


def test_update_attr_sets_the_module_attribute_and_the_optimizer_as_lightning_does(tmp_path):
    finder = LRFinder(min_lr=1e-5, max_lr=1.0, num_training_steps=20)
    module = Plain(lr=123.0)
    trainer = make_trainer(callbacks=[finder], max_steps=2)
    trainer.fit(module, make_loaders()[0])
    lr = finder.suggestions.valley
    assert module.lr == lr
    assert trainer.optimizers[0].param_groups[0]["lr"] == lr


def test_update_attr_keeps_the_ratios_between_groups(tmp_path):
    learn = make_learner(tmp_path)
    for group in learn.opt.param_groups:  # two per layer group (no decay on norms and biases)
        group["lr"] = [1e-5, 1e-4, 1e-3][group[GROUP_INDEX_KEY]]
    finder = LRFinder(min_lr=1e-5, max_lr=1.0, num_training_steps=20)
    make_trainer(callbacks=[finder], max_steps=1).fit(learn.module, make_loaders()[0])
    lr = finder.suggestions.valley
    got = [group["lr"] for group in learn.opt.param_groups]
    want = [[lr / 100, lr / 10, lr][group[GROUP_INDEX_KEY]] for group in learn.opt.param_groups]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_update_attr_scales_a_param_scheduler_so_the_head_peaks_at_the_suggestion(tmp_path):
    peaks = np.array([1e-4, 1e-3, 1e-2])
    scheduler = ParamScheduler(one_cycle_lr(peaks))
    outer = Recorder()
    finder = LRFinder(min_lr=1e-5, max_lr=1.0, num_training_steps=20)
    make_trainer(callbacks=[scheduler, finder, outer], max_epochs=1).fit(
        make_learner(tmp_path).module, make_loaders()[0]
    )
    factor = finder.suggestions.valley / 1e-2
    n = len(outer.lrs)  # 6 batches of 16
    expected = np.array([one_cycle_lr(peaks)(i / n) for i in range(n)]) * factor
    np.testing.assert_allclose(outer.lrs, expected, rtol=1e-9)


def test_with_gradual_unfreezing_it_sweeps_each_stage_and_refuses_to_rewrite_the_plan(tmp_path):
    stages = [Stage(-1, 1, 1e-3), Stage(0, 1, slice(1e-5, 1e-3))]
    module = make_learner(tmp_path).module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    refused = LRFinder(num_training_steps=10)
    with pytest.raises(ValueError, match="cannot change a GradualUnfreezing plan"):
        make_trainer(callbacks=[GradualUnfreezing(stages), refused], max_epochs=2).fit(
            module, make_loaders()[0]
        )
    assert refused.runs == []
    for key, value in before.items():
        assert torch.equal(value, module.state_dict()[key]), key

    finder = LRFinder(num_training_steps=10, update_attr=False, milestones=[1])
    make_trainer(
        callbacks=[GradualUnfreezing(stages), finder], max_epochs=2, limit_train_batches=2
    ).fit(make_learner(tmp_path).module, make_loaders()[0])
    assert [run.epoch for run in finder.runs] == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"mode": "cubic"}, ValueError, "mode must be 'exponential' or 'linear'"),
        ({"num_training_steps": 1}, ValueError, "num_training_steps must be an int >= 2"),
        ({"mode": "linear", "min_lr": 1.0, "max_lr": 1e-3}, ValueError, "min_lr must be below"),
        ({"min_lr": 1e-3, "max_lr": 1e-3}, ValueError, "min_lr must be below max_lr"),
        ({"min_lr": 0.0}, ValueError, "min_lr is 0.0"),
        ({"suggest_funcs": None}, ValueError, "update_attr=True applies the first suggestion"),
        ({"early_stop_threshold": 0}, ValueError, "early_stop_threshold"),
        ({"milestones": [-1]}, ValueError, "milestone must be an int >= 0"),
    ],
)
def test_bad_arguments_are_refused_when_made(kwargs, error, words):
    with pytest.raises(error, match=words):
        LRFinder(**kwargs)


@pytest.mark.parametrize(
    ("finder", "error", "words"),
    [
        (
            LRFinder(min_lr=[1e-3, 1e-3, 1e-3], max_lr=[1.0, 1e-4, 1.0]),
            ValueError,
            r"min_lr must be below max_lr for every layer group",
        ),
        (LRFinder(min_lr=[1e-7, 1e-7]), ValueError, "min_lr has 2 values but the model has 3"),
        (LRFinder(attr_name="step_size"), AttributeError, "attr_name='step_size'"),
    ],
)
def test_bad_bounds_or_attributes_are_refused_at_the_fit_before_anything_changes(
    tmp_path, finder, error, words
):
    module = make_learner(tmp_path).module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error, match=words):
        make_trainer(callbacks=[finder], max_steps=2).fit(module, make_loaders()[0])
    assert finder.runs == []
    for key, value in before.items():
        assert torch.equal(value, module.state_dict()[key]), key


def test_a_multi_process_strategy_is_refused_naming_it_and_the_alternative(tmp_path):
    trainer = make_trainer(strategy="ddp", accelerator="cpu", devices=1)
    with pytest.raises(ValueError, match=r"under DDPStrategy .*Learner\(\.\.\.\)\.lr_find\(\)"):
        LRFinder().setup(trainer, Plain(), "fit")
