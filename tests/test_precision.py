"""Mixed precision with every piece: ``bf16-mixed`` on the CPU, and float16 with a ``GradScaler``.

``bf16-mixed`` runs on the CPU, so the one-cycle, the exact lr_find, the NaN guard, the fused
optimizer and checkpoints with a resume are checked here in one process (``tests/test_handback.py``
checks it from a notebook's forked workers). ``"16-mixed"`` asks for a GPU in Lightning (on a CPU
it becomes ``bf16-mixed``), but its ``GradScaler`` runs on the CPU with float16 autocast when
Lightning's ``MixedPrecision`` plugin is given one: the scaler's skipped steps are then real
(float16 gradients overflow at a large initial scale), and the same checks run on CUDA when
there is one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from difflr.optim.implementation import describe_optimizer
from tests.helpers import make_learner

BF16 = {"accelerator": "cpu", "precision": "bf16-mixed"}


def state(learn) -> dict[str, object]:
    import copy

    return {
        "model": {k: v.detach().clone() for k, v in learn.model.state_dict().items()},
        "opt": copy.deepcopy(learn.opt.state_dict()),
    }


def assert_same(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


class AutocastSeen(Callback):
    """The dtype of the model's output in the first training batch (what autocast gave)."""

    def __init__(self) -> None:
        self.dtype = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.dtype is None:
            with trainer.precision_plugin.forward_context():
                self.dtype = pl_module.model(batch[0]).dtype


# ----------------------------------------------------------------------------------- bf16-mixed
def test_bf16_one_cycle_records_the_planned_lrs_with_the_fused_optimizer(tmp_path) -> None:
    seen = AutocastSeen()
    learn = make_learner(tmp_path, callbacks=[seen], **BF16)
    assert describe_optimizer(learn.opt) == "AdamW (fused)"
    planned = learn.preview_one_cycle(2, slice(1e-4, 1e-2))
    learn.fit_one_cycle(2, slice(1e-4, 1e-2))
    assert seen.dtype == torch.bfloat16  # the forward ran under bf16 autocast
    np.testing.assert_allclose(learn.recorder.lrs, planned.lrs, rtol=1e-12)
    np.testing.assert_allclose(learn.recorder.moms, planned.moms, rtol=1e-12)
    # The weights and the optimizer's moments stay float32 (bf16 is the compute type only),
    # and the fused implementation is kept through the fit.
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    moments = [s["exp_avg"] for s in learn.opt.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert describe_optimizer(learn.opt) == "AdamW (fused)"
    assert {int(s["step"]) for s in learn.opt.state.values()} == {12}


def test_bf16_lr_find_restores_weights_buffers_optimizer_and_rng_bit_for_bit(tmp_path) -> None:
    learn = make_learner(tmp_path, **BF16)
    learn.fit_one_cycle(1, 1e-2)  # an optimizer state to restore
    before, rng = state(learn), torch.get_rng_state()
    learn.lr_find(num_it=20, show_plot=False)
    assert len(learn.recorder.lrs) > 5
    assert_same(before, state(learn))
    assert torch.equal(rng, torch.get_rng_state())


class NanLossAt:
    def __init__(self, call: int) -> None:
        self.call, self.calls = call, 0

    def __call__(self, preds, target):
        self.calls += 1
        loss = F.cross_entropy(preds, target)
        return loss * math.nan if self.calls == self.call else loss


def test_bf16_nan_guard_stops_before_the_update_and_restores_the_statistics(tmp_path) -> None:
    learn = make_learner(tmp_path, loss_func=NanLossAt(3), **BF16)

    class Before(Callback):  # the state when the failing (third) batch starts
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                self.saved = state(learn)["model"]

    before = Before()
    learn.callbacks.append(before)
    with pytest.raises(FloatingPointError, match="the training loss is nan at optimizer step 2"):
        learn.fit_one_cycle(1, 1e-2)
    assert_same(before.saved, state(learn)["model"])  # weights and BatchNorm statistics
    assert len(learn.recorder.lrs) == 2


def test_bf16_checkpoint_resume_ends_where_the_uninterrupted_fit_does(tmp_path) -> None:
    class Crash(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 1:
                raise RuntimeError("simulated crash")

    full = make_learner(tmp_path / "full", **BF16)
    full.fit_one_cycle(3, 1e-2)
    crashed = make_learner(tmp_path / "run", callbacks=[Crash()], **BF16)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit_one_cycle(3, 1e-2)
    resumed = make_learner(tmp_path / "run", **BF16)
    resumed.fit_one_cycle(3, 1e-2, ckpt_path="last")
    assert_same(state(full), state(resumed))
    np.testing.assert_array_equal(full.recorder.lrs, resumed.recorder.lrs)
    np.testing.assert_array_equal(full.recorder.losses, resumed.recorder.losses)


# ------------------------------------------------------------------------- float16, GradScaler
def _devices() -> list[object]:
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return ["cpu", pytest.param("cuda", marks=cuda)]


def fp16_learner(tmp_path, device: str, init_scale: float, **kwargs):
    """A Learner whose steps go through a ``GradScaler`` (float16 autocast) on ``device``."""
    scaler = torch.amp.GradScaler(device, init_scale=init_scale)
    plugin = MixedPrecision("16-mixed", device=device, scaler=scaler)
    accelerator = "gpu" if device == "cuda" else "cpu"
    learn = make_learner(tmp_path, accelerator=accelerator, devices=1, plugins=[plugin], **kwargs)
    return learn, scaler


@pytest.mark.parametrize("device", _devices())
def test_steps_the_grad_scaler_skips_are_not_nan_guard_failures_and_keep_the_schedule(
    tmp_path, device: str
) -> None:
    # 2**24 times these gradients overflows float16 (max 65504) for the first steps: the scaler
    # skips them (no update) and halves its scale until they fit.
    init_scale = 2.0**24
    learn, scaler = fp16_learner(tmp_path, device, init_scale, check_finite="grads")
    assert describe_optimizer(learn.opt) == "AdamW (fused)"  # the scaler skips a fused step too
    planned = learn.preview_one_cycle(2, slice(1e-4, 1e-2))
    learn.fit_one_cycle(2, slice(1e-4, 1e-2))
    skipped = round(math.log2(init_scale / scaler.get_scale()))
    total = learn.trainer.global_step
    assert total == 12 and 0 < skipped < total
    # The schedule counted every step, skipped or not, and ended where it was planned to.
    np.testing.assert_allclose(learn.recorder.lrs, planned.lrs, rtol=1e-12)
    assert len(learn.recorder.losses) == total and np.isfinite(learn.recorder.losses).all()
    # Only the steps the scaler let through updated the weights (AdamW counts its own steps).
    assert {int(s["step"]) for s in learn.opt.state.values()} == {total - skipped}
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


@pytest.mark.parametrize("device", _devices())
def test_gradients_not_finite_at_a_loss_scale_below_one_stop_the_guard(
    tmp_path, device: str
) -> None:
    def sqrt_at_zero(preds, target):  # a finite loss whose gradient is infinite at any scale
        return F.cross_entropy(preds, target) + (preds - preds.detach()).abs().sqrt().sum()

    learn, scaler = fp16_learner(
        tmp_path, device, 4.0, loss_func=sqrt_at_zero, check_finite="grads"
    )
    with pytest.raises(FloatingPointError, match=r"not finite even at a loss scale of 0\.5"):
        learn.fit_one_cycle(1, 1e-2)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert len(learn.recorder.lrs) == 4  # scales 4, 2, 1 skipped; 0.5 stopped
    assert scaler.get_scale() == 0.5


def test_a_non_finite_loss_stops_the_guard_under_the_grad_scaler(tmp_path) -> None:
    learn, _ = fp16_learner(tmp_path, "cpu", 2.0**16, loss_func=NanLossAt(2))
    with pytest.raises(FloatingPointError, match="the training loss is"):
        learn.fit_one_cycle(1, 1e-2)


def test_16_mixed_on_a_cpu_is_lightnings_bf16(tmp_path) -> None:
    learn = make_learner(tmp_path, accelerator="cpu", precision="16-mixed")
    with pytest.warns(UserWarning, match="Using `precision='bf16-mixed'` instead"):
        trainer = learn.runner.trainer([], standard=False)
    assert trainer.precision == "bf16-mixed"
    assert getattr(trainer.precision_plugin, "scaler", None) is None
