"""The recorder and the per-step callbacks on tiny models: skipped steps, log resolution,
frozen normalisation layers."""

from __future__ import annotations

import math
import re

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from difflr import GradualUnfreezing, Recorder, Stage
from difflr.callbacks.progress import LiveProgress
from difflr.callbacks.recorder import HYPER_POINTS_PER_FIT
from difflr.callbacks.step_loss import SmoothedLoss
from tests.helpers import make_learner, make_loaders, make_model, make_trainer, three_groups


class SkipsEveryThirdBatch(pl.LightningModule):
    """Returns None from training_step for batches 0, 3, ...: Lightning's way to skip them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def training_step(self, batch, batch_idx):
        if batch_idx % 3 == 0:
            return None
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # LR 0: every loss is the same


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_a_skipped_step_is_left_out_of_the_smoothed_loss_not_counted_as_zero(tmp_path):
    recorder = Recorder(log_hypers=False)
    trainer = make_trainer(max_epochs=1, callbacks=[recorder])
    module = SkipsEveryThirdBatch()
    train = make_loaders()[0]
    trainer.fit(module, train)
    losses = recorder.losses
    assert len(losses) == len(recorder.lrs) == 6
    assert np.isnan(losses[[0, 3]]).all()
    # With LR 0 the model never changes: the taken steps' losses are the plain batch losses,
    # smoothed without the skipped ones (a 0 in their place would pull the average down).
    with torch.no_grad():
        batch_losses = [F.cross_entropy(module.net(x), y).item() for x, y in train]
    ema = SmoothedLoss()
    expected = [math.nan if i % 3 == 0 else ema.update(loss) for i, loss in enumerate(batch_losses)]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    assert recorder.values[-1]["train_loss"] == expected[-1]


def test_every_step_of_a_fit_of_up_to_200_steps_reaches_the_logger(tmp_path):
    learn = make_learner(tmp_path, logger=True, checkpoint=False)
    learn.fit_one_cycle(5, slice(1e-4, 1e-2))  # 30 steps
    (events,) = tmp_path.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    for tag in ("lr/0.stem", "lr/2.head", "mom/1.body"):
        points = accumulator.Scalars(tag)
        assert [p.step for p in points] == list(range(30)), tag
    head = [p.value for p in accumulator.Scalars("lr/2.head")]
    np.testing.assert_allclose(head, learn.recorder.lrs[:, 2], rtol=1e-6)


def test_a_long_fit_logs_about_the_points_that_resolve_its_schedule(tmp_path):
    train, valid = make_loaders(n=192, batch_size=2)  # 96 steps an epoch
    learn = make_learner(
        tmp_path,
        data=(train, valid),
        logger=CSVLogger(tmp_path, name="csv"),
        checkpoint=False,
        limit_val_batches=1,
    )
    learn.fit_one_cycle(5, 1e-3)  # 480 steps: every 2nd step is logged
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("lr/2.head")
    logged = [r for r in rows[1:] if r.split(",")[column]]
    assert 480 // 2 == len(logged) >= HYPER_POINTS_PER_FIT


def test_train_bn_false_leaves_the_frozen_norm_statistics_unchanged(tmp_path):
    learn = make_learner(tmp_path, checkpoint=False, train_bn=False)
    learn.freeze()
    bn = learn.model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    learn.fit_one_cycle(1, 1e-2)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    learn.unfreeze()
    learn.fit(1, 1e-3)
    assert not torch.equal(bn.running_mean, before[0])  # unfrozen, it follows the data again
    assert bn.training  # and the model is left in train mode


def test_train_bn_true_keeps_updating_them(tmp_path):
    learn = make_learner(tmp_path, checkpoint=False)
    learn.freeze()
    before = learn.model[1].running_mean.clone()
    learn.fit_one_cycle(1, 1e-2)
    assert not torch.equal(learn.model[1].running_mean, before)


class LitSix(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def model_splits(self):
        return list(three_groups(self.net).values())

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


def test_the_unfreezing_callback_keeps_frozen_norm_statistics_without_train_bn(tmp_path):
    module = LitSix()
    bn = module.net[1]
    before = bn.running_mean.clone()
    plan = [Stage(-1, 1, 1e-3), Stage(-2, 1, 1e-3)]  # the stem stays frozen throughout
    trainer = make_trainer(max_epochs=2, callbacks=[GradualUnfreezing(plan, train_bn=False)])
    trainer.fit(module, make_loaders()[0])
    assert torch.equal(bn.running_mean, before)


def test_tensorboard_shows_every_groups_lr_on_one_chart_and_momentum_on_another(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    learn = make_learner(tmp_path, logger=True, checkpoint=False)
    learn.fit_one_cycle(1, slice(1e-4, 1e-2))
    (events,) = tmp_path.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
    accumulator.Reload()
    [config] = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(config.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts == {"lr, every layer group": ["lr/.*"], "momentum, every layer group": ["mom/.*"]}
    # The patterns catch every group's tag.
    tags = accumulator.Tags()["scalars"]
    assert {t for t in tags if re.fullmatch("lr/.*", t)} == {"lr/0.stem", "lr/1.body", "lr/2.head"}


class OneElementLoss(LitSix):
    """A user's module whose training_step returns its loss with shape ``(1,)`` (``backward``
    takes it); it keeps every batch's loss to compare the curves with."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y).reshape(1)
        self.batch_losses.append(loss.item())
        return loss


def _smoothed(batch_losses: list[float]) -> list[float]:
    ema = SmoothedLoss()
    return [ema.update(loss) for loss in batch_losses]


def test_a_user_module_whose_loss_has_shape_1_is_recorded_in_a_plain_trainer():
    module, recorder = OneElementLoss(), Recorder(log_hypers=False)
    trainer = make_trainer(max_epochs=2, callbacks=[recorder])
    trainer.fit(module, make_loaders()[0])
    expected = _smoothed(module.batch_losses)
    assert len(expected) == len(recorder.lrs) == 12
    np.testing.assert_allclose(recorder.losses, expected, rtol=1e-6)
    assert [row["train_loss"] for row in recorder.values] == [expected[5], expected[11]]


@pytest.mark.filterwarnings("ignore:.*configure_optimizers is superseded")
@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_a_user_module_whose_loss_has_shape_1_fits_and_sweeps_in_a_learner(tmp_path):
    module = OneElementLoss()
    learn = make_learner(
        tmp_path, module, loss_func=None, splitter=None, checkpoint=False, enable_progress_bar=True
    )
    learn.fit_one_cycle(2, 1e-3)
    expected = _smoothed(module.batch_losses)
    np.testing.assert_allclose(learn.recorder.losses, expected, rtol=1e-6)
    assert learn.recorder.values[-1]["train_loss"] == expected[-1]
    # The live line reads the same loss: it ends on the table's train_loss.
    (live,) = [cb for cb in learn.trainer.callbacks if isinstance(cb, LiveProgress)]
    assert live.loss == expected[-1]

    module.batch_losses.clear()
    learn.lr_find(end_lr=1e-2, num_it=10, show_plot=False)
    np.testing.assert_allclose(learn.recorder.losses, _smoothed(module.batch_losses), rtol=1e-6)
    assert len(learn.recorder.losses) == 10
