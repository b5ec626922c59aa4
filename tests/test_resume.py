"""Nothing lost: checkpoints and resume, non-finite losses, bad batches, save/load, repeated use."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from difflr import Learner, Stage
from tests.helpers import Crash, make_learner, make_loaders, make_model, three_groups


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_a_one_cycle_killed_between_epochs_resumes_to_the_same_weights(tmp_path):
    full = make_learner(tmp_path / "full")
    full.freeze()
    full.fit_one_cycle(4, slice(1e-4, 1e-2))

    crashed = make_learner(tmp_path / "run", callbacks=[Crash(epoch=2, batch=0)])
    crashed.freeze()
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit_one_cycle(4, slice(1e-4, 1e-2))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

    resumed = make_learner(tmp_path / "run")  # a fresh session: new model, unfrozen
    resumed.fit_one_cycle(4, slice(1e-4, 1e-2), ckpt_path="last")
    assert resumed.frozen == [True, True, False]
    assert_same_weights(full.model, resumed.model)
    np.testing.assert_allclose(resumed.recorder.lrs, full.recorder.lrs)
    np.testing.assert_allclose(resumed.recorder.losses, full.recorder.losses)
    assert [r["epoch"] for r in resumed.recorder.values] == [0, 1, 2, 3]


def test_a_stage_plan_killed_in_stage_three_resumes_to_the_same_weights(tmp_path):
    plan = [
        Stage(-1, 1, 1e-2),
        Stage(-2, 1, slice(1e-3, 1e-2)),
        Stage(0, 2, slice(1e-4, 1e-2)),
        Stage(0, 1, 1e-4),
    ]
    full = make_learner(tmp_path / "full")
    full.fit_stages(plan)

    crashed = make_learner(tmp_path / "run", callbacks=[Crash(epoch=1, batch=3)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit_stages(plan)  # the crash hits the second epoch of stage 3
    resumed = make_learner(tmp_path / "run")
    resumed.fit_stages(plan, ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert_same_weights(full.model, resumed.model)
    np.testing.assert_allclose(resumed.recorder.lrs, full.recorder.lrs)
    assert resumed.recorder.boundaries == full.recorder.boundaries


def test_resuming_with_a_different_call_is_refused(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit_one_cycle(1, 1e-3)
    with pytest.raises(ValueError, match="written by a different fit: stages has 1 entries"):
        learn.fine_tune(1, ckpt_path="last")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        learn.fit(1, ckpt_path=tmp_path / "nope.ckpt")


def test_monitor_keeps_the_best_checkpoint(tmp_path):
    learn = make_learner(tmp_path, monitor="valid_loss")
    learn.fit_one_cycle(2, 1e-2)
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()


def test_a_nan_loss_stops_before_the_update_and_names_step_loss_and_lrs(tmp_path):
    class NaNAt(nn.Module):
        def __init__(self, step):
            super().__init__()
            self.net, self.calls, self.step = make_model(), 0, step

        def forward(self, x):
            self.calls += 1
            out = self.net(x)
            return out * float("nan") if self.calls == self.step + 1 else out

    model = NaNAt(step=4)
    learn = Learner(
        model,
        make_loaders(),
        F.cross_entropy,
        splitter=lambda m: three_groups(m.net),
        path=tmp_path,
        logger=False,
        enable_progress_bar=False,
    )
    seen = {}

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}

    learn.callbacks.append(Spy())
    with pytest.raises(
        FloatingPointError, match=r"loss is nan at optimizer step 4 .*LRs: 0\.stem="
    ):
        learn.fit_one_cycle(1, 1e-2)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    # The parameters are those of the last finite step (the failing batch's forward did update
    # the BatchNorm running statistics, with finite values).
    for key, value in model.named_parameters():
        assert torch.equal(value, seen["weights"][key]), key
    assert learn.recorder.lrs.shape[0] == 4


def test_a_batch_the_model_cannot_take_shows_its_structure(tmp_path):
    bad = DataLoader(
        TensorDataset(torch.randn(8, 5), torch.zeros(8, dtype=torch.long)), batch_size=4
    )
    learn = Learner(
        make_model(),
        (bad, None),
        F.cross_entropy,
        splitter=three_groups,
        path=tmp_path,
        logger=False,
        enable_progress_bar=False,
    )
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(
        RuntimeError, match=r"on a batch list\[Tensor\(4, 5\):float32, Tensor\(4,\):int64\]"
    ):
        learn.fit(1)
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


def test_save_and_load_keep_model_optimizer_and_freeze_pattern(tmp_path):
    learn = make_learner(tmp_path)
    learn.freeze()
    learn.fit_one_cycle(1, 1e-2)
    file = learn.save("stage1")
    other = make_learner(tmp_path)
    other.load("stage1")
    assert_same_weights(learn.model, other.model)
    assert other.frozen == [True, True, False]
    assert other.opt.state_dict()["state"].keys() == learn.opt.state_dict()["state"].keys()
    weights_only = make_learner(tmp_path).load(file, with_opt=False)
    assert len(weights_only.opt.state) == 0


def test_export_writes_a_model_for_inference(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1)
    model = torch.load(learn.export(), weights_only=False)
    x = torch.randn(4, 6)
    assert torch.equal(model(x), learn.model.eval()(x))


def test_repeated_use_keeps_groups_state_and_figures_constant(tmp_path):
    learn = make_learner(tmp_path, checkpoint=False)
    n_groups = len(learn.opt.param_groups)
    figures = len(plt.get_fignums())
    for i in range(8):
        learn.freeze() if i % 2 else learn.unfreeze()
        learn.lr_find(num_it=10, show_plot=False)
        learn.fit_one_cycle(1, 1e-3)
        learn.recorder.plot_sched()
        learn.recorder.plot_loss()
    assert len(learn.opt.param_groups) == n_groups
    assert len(learn.opt.state) <= len(list(learn.model.parameters()))
    assert len(plt.get_fignums()) == figures
    assert learn.recorder.boundaries == [0]  # each call starts a new record


def test_check_finite_false_lets_a_nan_loss_through(tmp_path):
    x = torch.randn(32, 6)
    x[5, 0] = float("nan")  # one poisoned sample in the first batch
    data = DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long)), batch_size=16)
    guarded = make_learner(tmp_path, data=(data, None), checkpoint=False)
    with pytest.raises(FloatingPointError, match="loss is nan at optimizer step 0"):
        guarded.fit(1)
    unguarded = make_learner(tmp_path, data=(data, None), checkpoint=False, check_finite=False)
    unguarded.fit(1)  # trains on, as plain Lightning would
    assert not all(torch.isfinite(p).all() for p in unguarded.model.parameters())
