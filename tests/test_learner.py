"""Integration tests of the Learner on a tiny three-group model."""

from __future__ import annotations

import functools
import math
import signal
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from difflr import Learner, accuracy
from difflr.optim.param_groups import read_hypers
from difflr.policy.schedules import one_cycle_lr, one_cycle_mom
from tests import helpers
from tests.helpers import make_loaders, make_model, quiet, three_groups


def make_learner(loaders, learner_kwargs, **kwargs) -> Learner:
    return helpers.make_learner(data=loaders, **{**learner_kwargs, **kwargs})


def closed_form_one_cycle(lr_max, n_steps, div=25.0, div_final=1e5, pct_start=0.25, moms=None):
    lr_sched = one_cycle_lr(np.array(lr_max), pct_start, div, div_final)
    mom_sched = one_cycle_mom(moms or (0.95, 0.85, 0.95), pct_start)
    pcts = np.arange(n_steps) / n_steps
    return np.stack([lr_sched(p) for p in pcts]), np.array([[mom_sched(p)] * 3 for p in pcts])


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fit_one_cycle_records_every_groups_lr_and_mom_in_closed_form(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    learn.fit_one_cycle(2, slice(1e-5, 1e-3), pct_start=0.3)
    n_steps = 2 * len(loaders[0])
    lrs, moms = closed_form_one_cycle([1e-5, 1e-4, 1e-3], n_steps, pct_start=0.3)
    assert learn.recorder.lrs.shape == (n_steps, 3)
    np.testing.assert_allclose(learn.recorder.lrs, lrs, rtol=1e-12)
    np.testing.assert_allclose(learn.recorder.moms, moms, rtol=1e-12)
    # Discriminative ratios hold at every step.
    np.testing.assert_allclose(learn.recorder.lrs / learn.recorder.lrs[:, -1:], lrs / lrs[:, -1:])
    assert learn.recorder.losses.shape == (n_steps,)
    assert np.isfinite(learn.recorder.losses).all()


def test_every_torch_param_group_of_a_layer_group_gets_its_lr(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    learn.fit_one_cycle(1, [1e-4, 2e-4, 3e-4])
    # After the last step the optimizer holds the schedule's end: lr_max / div_final, moms[2].
    end = np.array([1e-4, 2e-4, 3e-4]) / 1e5
    assert len(learn.opt.param_groups) == 6
    for pg in learn.opt.param_groups:
        assert pg["lr"] == pytest.approx(end[pg["layer_group"]], rel=1e-12)
        assert pg["betas"][0] == pytest.approx(0.95)


def test_fine_tune_records_both_phases_in_closed_form(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    learn.fine_tune(2, base_lr=2e-3, freeze_epochs=1)
    steps = len(loaders[0])
    rec = learn.recorder
    assert rec.boundaries == [0, steps]
    assert rec.trainable == [[True, False, True], [True, True, True]]  # stem keeps its BatchNorm
    lrs1, moms1 = closed_form_one_cycle([2e-4, 2e-4, 2e-3], steps, pct_start=0.99)
    lrs2, moms2 = closed_form_one_cycle([1e-5, 1e-4, 1e-3], 2 * steps, pct_start=0.3, div=5.0)
    np.testing.assert_allclose(rec.lrs, np.concatenate([lrs1, lrs2]), rtol=1e-12)
    np.testing.assert_allclose(rec.moms, np.concatenate([moms1, moms2]), rtol=1e-12)
    assert [row["epoch"] for row in rec.values] == [0, 1, 2]


def test_fit_and_fit_flat_cos_leave_momentum_and_follow_their_schedules(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    learn.fit(1, lr=slice(1e-3))
    assert np.allclose(learn.recorder.lrs, [1e-4, 1e-4, 1e-3])
    assert np.allclose(learn.recorder.moms, 0.9)  # AdamW's default beta1, untouched
    learn.fit_flat_cos(2, lr=1e-3, pct_start=0.5)
    lrs = learn.recorder.lrs[:, 0]
    n = len(lrs)
    assert np.allclose(lrs[: n // 2], 1e-3)
    assert lrs[-1] < 1e-4


def test_head_only_fit_leaves_frozen_groups_untouched_but_trains_batchnorm(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    learn.freeze()
    before = weights(learn.model)
    learn.fit_one_cycle(1, 1e-2)
    after = weights(learn.model)
    for key in ("0.weight", "0.bias", "3.weight", "3.bias"):
        assert torch.equal(before[key], after[key]), key
    for key in ("1.weight", "5.weight", "1.running_mean"):
        assert not torch.equal(before[key], after[key]), key


def test_frozen_params_get_no_gradient_and_no_optimizer_state(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs, train_bn=False)
    learn.freeze()
    learn.fit_one_cycle(1, 1e-2)
    frozen = [p for g in learn.splits[:2] for p in g.params]
    assert all(p.grad is None for p in frozen)
    assert all(p not in learn.opt.state for p in frozen)
    assert all(p in learn.opt.state for p in learn.splits[2].params)


def test_optimizer_keeps_every_group_for_its_lifetime_with_unique_names(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    groups_before = [pg["name"] for pg in learn.opt.param_groups]
    learn.freeze()
    learn.fit_one_cycle(1, 1e-3)
    learn.unfreeze()
    learn.fit_one_cycle(1, slice(1e-5, 1e-3))
    assert [pg["name"] for pg in learn.opt.param_groups] == groups_before
    assert len(set(groups_before)) == len(groups_before) == 6


def test_no_weight_decay_on_biases_and_norm_params(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs, wd=0.1)
    for pg in learn.opt.param_groups:
        assert pg["weight_decay"] == (0.0 if pg.get("no_decay") else 0.1), pg["name"]
    learn.fit(1, wd=0.3)
    assert {pg["weight_decay"] for pg in learn.opt.param_groups} == {0.0, 0.3}


def test_freeze_change_clears_optimizer_state_but_a_repeated_freeze_does_not(
    loaders, learner_kwargs
):
    learn = make_learner(loaders, learner_kwargs)
    learn.fit(1)
    assert len(learn.opt.state) > 0
    learn.unfreeze()  # the pattern was already all-trainable
    assert len(learn.opt.state) > 0
    learn.freeze()
    assert len(learn.opt.state) == 0


def test_freeze_on_a_single_group_model_warns(loaders, tmp_path):
    with pytest.warns(UserWarning, match="found no layer groups"):
        learn = helpers.make_learner(tmp_path, data=loaders, splitter=None)
    with pytest.warns(UserWarning, match="single layer group"):
        learn.freeze()


def test_sgd_momentum_follows_the_one_cycle(loaders, learner_kwargs):
    opt_func = functools.partial(torch.optim.SGD, momentum=0.9)
    learn = make_learner(loaders, learner_kwargs, opt_func=opt_func)
    learn.fit_one_cycle(1, 1e-2, moms=(0.9, 0.8, 0.9))
    n = len(loaders[0])
    _, moms = closed_form_one_cycle([1e-2] * 3, n, moms=(0.9, 0.8, 0.9))
    np.testing.assert_allclose(learn.recorder.moms, moms)


def test_optimizer_without_momentum_records_nan_and_still_schedules_lr(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs, opt_func=torch.optim.Adagrad)
    learn.fit_one_cycle(1, 1e-2)
    assert np.isnan(learn.recorder.moms).all()
    assert learn.recorder.lrs[:, 0].max() == pytest.approx(1e-2, rel=0.05)


@pytest.mark.parametrize(
    ("trainer_kwargs", "expected_steps"),
    [
        ({"accumulate_grad_batches": 2}, 2 * 3),  # 6 batches per epoch -> 3 steps
        ({"accumulate_grad_batches": 4}, 2 * 2),  # 6 batches -> steps after 4 and at epoch end
        ({"limit_train_batches": 4}, 2 * 4),
    ],
)
def test_step_count_is_the_real_number_of_optimizer_steps(
    loaders, learner_kwargs, trainer_kwargs, expected_steps
):
    learn = make_learner(loaders, learner_kwargs, **trainer_kwargs)
    learn.fit_one_cycle(2, 1e-3)
    rec = learn.recorder
    assert rec.lrs.shape == (expected_steps, 3)
    lrs, _ = closed_form_one_cycle([1e-3] * 3, expected_steps)
    np.testing.assert_allclose(rec.lrs, lrs, rtol=1e-12)
    assert rec.losses.shape == (expected_steps,)


def test_drop_last_is_counted(learner_kwargs):
    x, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    train = DataLoader(TensorDataset(x, y), batch_size=16, drop_last=True)  # 6 batches, not 7
    learn = make_learner((train, None), learner_kwargs)
    learn.fit_one_cycle(1, 1e-3)
    lrs, _ = closed_form_one_cycle([1e-3] * 3, 6)
    np.testing.assert_allclose(learn.recorder.lrs, lrs, rtol=1e-12)


def test_gradient_accumulation_losses_average_the_batches_of_a_step(learner_kwargs):
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    plain = make_learner((train, None), learner_kwargs)
    plain.fit(1, lr=1e-12)  # practically no update: losses are the model's initial losses
    accum = make_learner((train, None), learner_kwargs, accumulate_grad_batches=2)
    accum.fit(1, lr=1e-12)
    model = make_model()
    with torch.no_grad():
        batch_losses = [
            float(F.cross_entropy(model(x[i : i + 16]), y[i : i + 16])) for i in range(0, 64, 16)
        ]
    step_losses = [np.mean(batch_losses[:2]), np.mean(batch_losses[2:])]
    first = step_losses[0]
    second = (0.98 * 0.02 * first + 0.02 * step_losses[1]) / (1 - 0.98**2)
    np.testing.assert_allclose(accum.recorder.losses, [first, second], rtol=1e-4)
    assert plain.recorder.losses[0] == pytest.approx(batch_losses[0], rel=1e-4)


def test_metrics_and_valid_loss_fill_the_epoch_rows(loaders, learner_kwargs, capsys):
    learn = make_learner(loaders, learner_kwargs, metrics=[accuracy])
    learn.fit_one_cycle(2, 1e-2)
    rows = learn.recorder.values
    assert [r["epoch"] for r in rows] == [0, 1]
    assert set(rows[0]) == {"epoch", "train_loss", "valid_loss", "accuracy", "time"}
    model, (_, valid) = learn.model.eval(), loaders
    with torch.no_grad():
        preds = torch.cat([model(x) for x, _ in valid])
        targets = torch.cat([y for _, y in valid])
    assert rows[-1]["accuracy"] == pytest.approx(float(accuracy(preds, targets)))
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
    assert len(out) == 3


def test_torchmetrics_metric_is_computed_over_the_validation_set(loaders, learner_kwargs):
    torchmetrics = pytest.importorskip("torchmetrics")
    metric = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
    learn = make_learner(loaders, learner_kwargs, metrics=[metric, accuracy])
    learn.fit(1, lr=1e-2)
    row = learn.recorder.values[-1]
    assert row["multiclassaccuracy"] == pytest.approx(row["accuracy"])


class LitModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def model_splits(self):
        return three_groups(self.net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_module_trains_with_the_learners_optimizer(loaders, tmp_path):
    module = LitModel()
    learn = helpers.make_learner(tmp_path, module, loaders, loss_func=None, splitter=None)
    assert [g.name for g in learn.splits] == ["0.stem", "1.body", "2.head"]
    with pytest.warns(UserWarning, match="configure_optimizers is superseded"):
        learn.fit_one_cycle(1, slice(1e-4, 1e-2))
    assert learn.trainer.optimizers[0] is learn.opt
    assert "configure_optimizers" not in module.__dict__  # the instance is restored
    assert isinstance(module.configure_optimizers(), torch.optim.SGD)
    assert "val_loss" in learn.recorder.values[-1]
    np.testing.assert_allclose(learn.recorder.lrs[-1] / learn.recorder.lrs[-1, -1], [0.01, 0.1, 1])


def test_lightning_datamodule_is_accepted(tmp_path, learner_kwargs):
    train, valid = make_loaders()

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return train

        def val_dataloader(self):
            return valid

    learn = make_learner(Data(), learner_kwargs)
    learn.fit(1)
    assert learn.recorder.lrs.shape == (len(train), 3)


def test_tensorboard_holds_group_tags_on_one_continuous_step_axis(loaders, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learn = helpers.make_learner(tmp_path, data=loaders, logger=True, log_every_n_steps=1)
    learn.freeze()
    learn.fit_one_cycle(1, 1e-3)
    learn.unfreeze()
    learn.fit_one_cycle(1, slice(1e-5, 1e-3))
    n = len(loaders[0])
    acc = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0")).Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("0.stem", "1.body", "2.head"):
        assert {f"lr/{name}", f"mom/{name}", f"trainable/{name}"} <= tags
    assert {"train_loss", "valid_loss", "epoch"} <= tags
    steps = [e.step for e in acc.Scalars("lr/2.head")]
    assert steps == list(range(2 * n))  # the second fit continues after the first
    head_lrs = [e.value for e in acc.Scalars("lr/2.head")]
    assert head_lrs[n:] == pytest.approx(learn.recorder.lrs[:, 2].tolist(), rel=1e-6)
    assert [e.value for e in acc.Scalars("trainable/1.body")] == [0.0, 1.0]
    assert [e.step for e in acc.Scalars("valid_loss")] == [n - 1, 2 * n - 1]


def test_logger_false_writes_nothing(loaders, learner_kwargs, tmp_path):
    learn = make_learner(loaders, learner_kwargs)
    learn.fit(1)
    assert not (tmp_path / "lightning_logs").exists()


class _Interrupt(Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise KeyboardInterrupt


def test_an_interrupt_raises_keyboard_interrupt_not_system_exit(loaders, learner_kwargs):
    handler = signal.getsignal(signal.SIGINT)
    learn = make_learner(loaders, learner_kwargs, callbacks=[_Interrupt(at_step=4)])
    with pytest.raises(KeyboardInterrupt, match="after 4 optimizer steps"):
        learn.fit_one_cycle(2, 1e-3)
    assert signal.getsignal(signal.SIGINT) is handler
    assert learn.recorder.lrs.shape == (4, 3)
    assert learn.recorder.losses.shape == (4,)
    learn.callbacks.clear()
    learn.fit(1)  # still usable
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        (lambda L: L.fit_one_cycle(0), ValueError, "epochs must be an int >= 1 .*got 0"),
        (lambda L: L.fit_one_cycle(1.5), TypeError, "epochs must be an int .*got 1.5"),
        (lambda L: L.fit_one_cycle(1, slice(0, 1e-3)), ValueError, "starts at 0"),
        (lambda L: L.fit_one_cycle(1, slice(1e-2, 1e-3)), ValueError, "lo > hi"),
        (lambda L: L.fit_one_cycle(1, -1e-3), ValueError, "lr_max is -0.001"),
        (lambda L: L.fit_one_cycle(1, math.nan), ValueError, "lr_max is nan"),
        (lambda L: L.fit_one_cycle(1, [1e-3, 1e-3]), ValueError, "2 values but the model has 3"),
        (
            lambda L: L.fit_one_cycle(1, pct_start=1.0),
            ValueError,
            "pct_start must be in \\(0, 1\\)",
        ),
        (lambda L: L.fit_one_cycle(1, pct_start=0), ValueError, "pct_start must be in \\(0, 1\\)"),
        (lambda L: L.fit_one_cycle(1, div=0), ValueError, "div must be a finite number > 0"),
        (lambda L: L.fit_one_cycle(1, div_final=-1), ValueError, "div_final must be"),
        (lambda L: L.fit_one_cycle(1, moms=(0.9, 0.8)), ValueError, "moms must be three values"),
        (lambda L: L.fit_one_cycle(1, moms=(0.9, 1.0, 0.9)), ValueError, "in \\[0, 1\\)"),
        (lambda L: L.fit(1, wd=-0.1), ValueError, "wd must be a finite number >= 0"),
        (lambda L: L.freeze_to(4), ValueError, "freeze_to\\(4\\) is out of range"),
        (lambda L: L.freeze_to(-4), ValueError, "\\[-3, 3\\]"),
        (lambda L: L.fine_tune(0), ValueError, "epochs must be an int >= 1"),
        (lambda L: L.fine_tune(1, lr_mult=0), ValueError, "lr_mult must be"),
    ],
)
def test_bad_fit_arguments_are_refused_before_anything_changes(
    loaders, learner_kwargs, call, exc, words
):
    learn = make_learner(loaders, learner_kwargs)
    learn.freeze()
    before = weights(learn.model)
    flags = [p.requires_grad for p in learn.model.parameters()]
    with pytest.raises(exc, match=words):
        call(learn)
    after = weights(learn.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in learn.model.parameters()] == flags
    assert learn.frozen == [True, True, False]
    assert learn.trainer is None


@pytest.mark.filterwarnings("ignore:difflr found no layer groups")
@pytest.mark.parametrize(
    ("make", "exc", "words"),
    [
        (lambda d: Learner(make_model(), d), TypeError, "needs a loss_func"),
        (lambda d: Learner("resnet", d, F.cross_entropy), TypeError, "must be an nn.Module"),
        (lambda d: Learner(make_model(), "data", F.cross_entropy), TypeError, "data must be"),
        (
            lambda d: Learner(make_model(), (d[0], 3), F.cross_entropy),
            TypeError,
            "validation loader .* must be a DataLoader",
        ),
        (
            lambda d: Learner(
                make_model(),
                d,
                F.cross_entropy,
                opt_func=torch.optim.AdamW(make_model().parameters()),
            ),
            TypeError,
            "opt_func must be an optimizer factory",
        ),
        (
            lambda d: Learner(make_model(), d, F.cross_entropy, opt_func=lambda pgs, lr: pgs),
            TypeError,
            "opt_func returned a list",
        ),
        (
            lambda d: Learner(make_model(), d, F.cross_entropy, splitter=lambda m: [m[0]]),
            ValueError,
            "in no layer group",
        ),
        (
            lambda d: Learner(make_model(), d, F.cross_entropy, max_epochs=3),
            TypeError,
            "pass n_epoch",
        ),
        (
            lambda d: Learner(make_model(), d, F.cross_entropy, moms=(0.9,)),
            ValueError,
            "moms must be three values",
        ),
        (lambda d: Learner(make_model(), d, F.cross_entropy, lr=0), ValueError, "lr is 0.0"),
        (
            lambda d: Learner(
                make_model(), (DataLoader(TensorDataset(torch.zeros(0, 6))), None), F.cross_entropy
            ),
            ValueError,
            "is empty \\(0 batches\\)",
        ),
    ],
)
def test_bad_learner_arguments_name_the_value_and_the_fix(loaders, make, exc, words):
    with pytest.raises(exc, match=words):
        make(loaders)


def test_summary_lists_groups_with_trainable_state(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs)
    learn.freeze()
    lines = learn.summary().splitlines()
    assert lines[0].split() == ["group", "params", "trainable", "lr", "modules"]
    assert lines[1].startswith("0.stem") and "norm only (32)" in lines[1]
    assert lines[2].split()[2] == "no" and lines[3].split()[2] == "yes"
    # The modules each group holds (three_groups: model[:3], model[3:5], model[5]).
    assert [line.split()[-1] for line in lines[1:4]] == ["0-1", "3", "5"]
    # No tied parameters; then the optimizer and the implementation its step runs.
    assert len(lines) == 5 and lines[4].startswith("optimizer: AdamW (")


def test_summary_shows_the_base_lr_then_the_last_fits_peak_per_group(loaders, learner_kwargs):
    learn = make_learner(loaders, learner_kwargs, lr=3e-3)
    lines = learn.summary().splitlines()
    assert [line.split()[3] for line in lines[:4]] == ["lr", "3.00e-03", "3.00e-03", "3.00e-03"]
    learn.fit_one_cycle(1, slice(1e-4, 1e-2))
    # Not the schedule's last value (1e-2 / div_final = 1e-7 for the head): its peak.
    lines = learn.summary().splitlines()
    assert [line.split()[3] for line in lines[:4]] == [
        "peak_lr",
        "1.00e-04",
        "1.00e-03",
        "1.00e-02",
    ]
    assert read_hypers(learn.opt)[0][-1] == pytest.approx(1e-2 / 1e5)  # what the column showed


def test_a_lightning_module_with_its_own_loaders_needs_no_data(tmp_path):
    train, valid = make_loaders()

    class WithData(LitModel):
        def train_dataloader(self):
            return train

        def val_dataloader(self):
            return valid

    learn = Learner(WithData(), **quiet(tmp_path))  # data=None: its own loaders
    planned = learn.preview_one_cycle(1, 1e-3)
    with pytest.warns(UserWarning, match="superseded"):
        learn.fit_one_cycle(1, 1e-3)
    np.testing.assert_allclose(planned.lrs, learn.recorder.lrs)
    assert "val_loss" in learn.recorder.values[-1]


def test_metrics_without_a_validation_loader_are_named_in_a_warning(loaders, learner_kwargs):
    train, valid = loaders
    with pytest.warns(UserWarning, match=r"metrics accuracy will not be computed.*valid_dl") as got:
        Learner(make_model(), train, F.cross_entropy, metrics=accuracy, **learner_kwargs)
    assert got[0].filename == __file__  # it points at the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Learner(make_model(), (train, valid), F.cross_entropy, metrics=accuracy, **learner_kwargs)
        Learner(make_model(), train, F.cross_entropy, **learner_kwargs)  # no metrics: nothing lost
