"""Checkpoints a resume can trust: mismatched, stale and foreign checkpoints are refused with the
difference named; non-finite models never replace a finite checkpoint; SIGTERM saves and exits;
a shuffling loader resumes bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from difflr import Learner
from difflr.training.checkpoints import read_fit_state
from difflr.utils.files import UnreadableFileError, safe_load
from tests.helpers import Crash, make_learner, make_loaders, make_model, run_script, three_groups

ROOT = Path(__file__).resolve().parents[1]


def crashed_learner(path, fit, epoch=2, **kwargs) -> Learner:
    learn = make_learner(path, callbacks=[Crash(epoch=epoch, batch=1)], **kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(learn)
    learn.callbacks.clear()
    return learn


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Mismatched and stale resumes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resume", "words"),
    [
        (lambda L: L.fit_one_cycle(3, 1e-2, ckpt_path="last"), r"stages\[0\]\.epochs is 5"),
        (lambda L: L.fit_one_cycle(5, 1e-4, ckpt_path="last"), r"stages\[0\]\.lrs\[0\] is 0\.01"),
        (
            lambda L: L.fit_one_cycle(5, 1e-2, pct_start=0.9, ckpt_path="last"),
            r"stages\[0\]\.pct_start is 0\.25 in the checkpoint, 0\.9 in this call",
        ),
        (lambda L: L.fit(5, 1e-2, ckpt_path="last"), r"stages\[0\]\.schedule is 'one_cycle'"),
        (lambda L: L.fine_tune(5, ckpt_path="last"), "stages has 1 entries in the checkpoint, 2"),
    ],
)
def test_a_resume_that_differs_from_the_fit_is_refused_naming_the_difference(
    tmp_path, resume, words
):
    learn = crashed_learner(tmp_path, lambda L: L.fit_one_cycle(5, 1e-2))
    before = weights(learn.model)
    with pytest.raises(ValueError, match=words):
        resume(learn)
    assert all(torch.equal(before[k], v) for k, v in weights(learn.model).items())


def test_a_resume_with_other_gradient_accumulation_is_refused(tmp_path):
    crashed_learner(tmp_path, lambda L: L.fit_one_cycle(5, 1e-2))
    other = make_learner(tmp_path, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="accumulate_grad_batches is 1 in the checkpoint, 2"):
        other.fit_one_cycle(5, 1e-2, ckpt_path="last")


def test_a_resume_with_another_batch_count_is_refused(tmp_path):
    crashed_learner(tmp_path, lambda L: L.fit_one_cycle(5, 1e-2))
    other = make_learner(tmp_path, data=make_loaders(n=64))
    with pytest.raises(ValueError, match="steps_per_epoch is 6 in the checkpoint, 4 in this call"):
        other.fit_one_cycle(5, 1e-2, ckpt_path="last")


@pytest.mark.parametrize(
    "fit", [lambda L, **k: L.fit_flat_cos(2, 1e-3, **k), lambda L, **k: L.fit_one_cycle(1, **k)]
)
def test_a_finished_fit_is_not_resumed_into_training_nothing(tmp_path, fit):
    learn = make_learner(tmp_path)
    fit(learn)
    with pytest.raises(ValueError, match="holds a fit that had finished"):
        fit(make_learner(tmp_path), ckpt_path="last")


def test_the_checkpoint_of_an_earlier_fit_is_not_taken_for_the_interrupted_one(tmp_path):
    # The case: the second fit dies before its first checkpoint.
    learn = make_learner(tmp_path, callbacks=[])
    learn.freeze()
    learn.fit_one_cycle(1, 1e-3)
    learn.unfreeze()
    learn.callbacks.append(Crash(epoch=0, batch=1))
    with pytest.raises(RuntimeError):
        learn.fit_one_cycle(4, slice(1e-5, 1e-3))
    learn.callbacks.clear()
    with pytest.raises(ValueError, match="earlier fit of this Learner"):
        learn.fit_one_cycle(4, slice(1e-5, 1e-3), ckpt_path="last")
    assert learn.frozen == [False, False, False]


def test_an_identical_earlier_fit_is_still_told_apart(tmp_path):
    learn = crashed_learner(tmp_path, lambda L: L.fit_one_cycle(3, 1e-2), epoch=1)
    learn.callbacks.append(Crash(epoch=0, batch=1))
    with pytest.raises(RuntimeError):
        learn.fit_one_cycle(3, 1e-2)
    learn.callbacks.clear()
    with pytest.raises(ValueError, match="earlier fit of this Learner"):
        learn.fit_one_cycle(3, 1e-2, ckpt_path="last")


def test_another_learners_checkpoint_on_the_same_path_is_refused(tmp_path):
    first = crashed_learner(tmp_path, lambda L: L.fit_one_cycle(3, 1e-2))
    make_learner(tmp_path).fit_one_cycle(3, 1e-2)  # a second Learner, same path, same fit
    with pytest.raises(ValueError, match="written by another Learner"):
        first.fit_one_cycle(3, 1e-2, ckpt_path="last")


HOLD_CLAIM = """
    import sys, time
    from pathlib import Path
    from difflr.training.checkpoints import FolderClaim
    with FolderClaim(Path(sys.argv[1]), "someone"):
        print("holding", flush=True)
        time.sleep(120)
    """


def test_a_fit_refuses_a_folder_claimed_by_a_live_learner(tmp_path):
    import textwrap

    other = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_CLAIM), str(tmp_path / "checkpoints")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert other.stdout.readline().strip() == "holding"
        learn = make_learner(tmp_path)
        with pytest.raises(
            RuntimeError, match=f"in use by another Learner's fit \\(process {other.pid}"
        ):
            learn.fit(1)
    finally:
        other.kill()
        other.wait()
    learn.fit(1)  # the system dropped the killed process's claim: no stale claim is left
    make_learner(tmp_path).fit(1)  # and a fit releases its claim when it ends


def test_a_claim_file_naming_a_live_process_does_not_block_a_fit(tmp_path):
    # The old claim (a pid file) took any live process with that pid for the holder: a reused
    # pid (here: this very test process) kept a folder blocked forever.
    (tmp_path / "checkpoints").mkdir()
    claim = {"pid": os.getpid(), "host": os.uname().nodename, "owner": "someone"}
    (tmp_path / "checkpoints" / ".claim").write_text(json.dumps(claim))
    learn = make_learner(tmp_path)
    learn.fit(1)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["difflr"]["epochs_done"] == 1


def test_a_checkpoint_from_groups_cut_differently_is_refused(tmp_path):
    crashed_learner(tmp_path, lambda L: L.fit_one_cycle(3, 1e-2))
    other = make_learner(tmp_path, splitter=lambda m: {"stem": m[:3], "body": m[3:5], "tip": m[5]})
    with pytest.raises(ValueError, match=r"groups\[2\]\.name is '2\.head' in the checkpoint"):
        other.fit_one_cycle(3, 1e-2, ckpt_path="last")


def test_a_truncated_checkpoint_is_named_with_the_fix(tmp_path):
    crashed_learner(tmp_path, lambda L: L.fit_one_cycle(3, 1e-2))
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(UnreadableFileError, match=r"last\.ckpt is not a complete checkpoint"):
        make_learner(tmp_path).fit_one_cycle(3, 1e-2, ckpt_path="last")


@pytest.mark.parametrize(
    ("content", "words"),
    [(3, "not a Lightning checkpoint"), ({"state_dict": {}}, "not written by a Learner fit")],
)
def test_a_foreign_checkpoint_is_refused(tmp_path, content, words):
    torch.save(content, tmp_path / "foreign.ckpt")
    with pytest.raises((UnreadableFileError, ValueError), match=words):
        make_learner(tmp_path).fit(1, ckpt_path=tmp_path / "foreign.ckpt")


# ------------------------------------------------------------------------------------------------
# What a resume reproduces
# ------------------------------------------------------------------------------------------------


def shuffling_loaders() -> tuple[DataLoader, DataLoader]:
    train, valid = make_loaders()
    return DataLoader(train.dataset, batch_size=16, shuffle=True), valid


def dropout_model() -> nn.Sequential:
    model = make_model()
    model.insert(4, nn.Dropout(0.3))
    return model


def dropout_run() -> dict:
    """The Learner arguments of the bit-for-bit resume tests: dropout, a shuffling loader."""
    return {
        "model": dropout_model(),
        "data": shuffling_loaders(),
        "splitter": lambda m: [m[:3], m[3:6], m[6]],
    }


def test_a_shuffling_loader_and_dropout_resume_bit_for_bit(tmp_path):
    torch.manual_seed(1)
    full = make_learner(
        tmp_path / "full",
        **dropout_run(),
    )
    full.fit_one_cycle(3, 1e-2)
    torch.manual_seed(1)
    crashed = crashed_learner(
        tmp_path / "run",
        lambda L: L.fit_one_cycle(3, 1e-2),
        **dropout_run(),
    )
    torch.manual_seed(123)  # whatever the new session's RNG holds
    resumed = make_learner(
        tmp_path / "run",
        **dropout_run(),
    )
    resumed.fit_one_cycle(3, 1e-2, ckpt_path="last")
    assert crashed is not resumed
    for key, value in weights(full.model).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_an_in_process_resume_continues_the_timeline(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    learn = crashed_learner(
        tmp_path, lambda L: L.fit_one_cycle(3, 1e-2), logger=CSVLogger(tmp_path, name="csv")
    )
    learn.fit_one_cycle(3, 1e-2, ckpt_path="last")
    assert learn.logger.step_offset == 18 and learn.logger.epoch_offset == 3
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    epochs = {
        float(r.split(",")[header.index("epoch")])
        for r in rows[1:]
        if r.split(",")[header.index("epoch")]
    }
    assert epochs == {0.0, 1.0, 2.0}  # the resumed epoch 2 is not logged as 3


# ------------------------------------------------------------------------------------------------
# Non-finite values never reach a checkpoint
# ------------------------------------------------------------------------------------------------


class PoisonAfter(Callback):
    """Turn a weight to NaN at the end of an epoch (a diverging run without a guard)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def test_a_nan_model_never_replaces_the_last_finite_checkpoint(tmp_path):
    learn = make_learner(tmp_path, check_finite=False, callbacks=[PoisonAfter(epoch=1)])
    with pytest.warns(UserWarning, match=r"not writing .*last\.ckpt: the model holds NaN"):
        learn.fit(3, 1e-3)
    state = read_fit_state(tmp_path / "checkpoints" / "last.ckpt")
    assert state.epochs_done == 1
    saved = safe_load(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())


def test_a_user_model_checkpoint_runs_beside_difflrs(tmp_path):
    mine = ModelCheckpoint(dirpath=tmp_path / "mine", save_last=True)
    learn = make_learner(tmp_path, callbacks=[mine])
    learn.fit(2)
    assert (tmp_path / "mine" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


# ------------------------------------------------------------------------------------------------
# The NaN guard checks what it claims
# ------------------------------------------------------------------------------------------------


def inf_batch_loaders() -> tuple[DataLoader, DataLoader]:
    train, valid = make_loaders()
    x, y = train.dataset.tensors
    x = x.clone()
    x[20, 0] = float("inf")  # batch 1 holds one inf
    return DataLoader(TensorDataset(x, y), batch_size=16), valid


def test_an_inf_input_leaves_the_norm_statistics_as_they_were(tmp_path):
    after_batch_0 = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            bn = pl_module.model[1]
            after_batch_0.setdefault("stats", (bn.running_mean.clone(), bn.running_var.clone()))

    learn = make_learner(tmp_path, data=inf_batch_loaders(), checkpoint=False, callbacks=[Spy()])
    with pytest.raises(FloatingPointError, match="normalisation statistics are as before"):
        learn.fit(1)
    bn = learn.model[1]
    mean, var = after_batch_0["stats"]  # the failing batch 1's forward moved them; put back
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)


class SqrtAtZero(nn.Module):
    """A finite loss with NaN gradients: d/dw sqrt(w - w.detach()) is infinite at 0, times 0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.net(x) + 0 * torch.sqrt(self.w - self.w.detach())


def sqrt_learner(tmp_path, check_finite) -> Learner:
    return make_learner(
        tmp_path,
        model=SqrtAtZero(),
        splitter=lambda m: [m.net[:3], [*m.net[3:].parameters(), m.w]],
        check_finite=check_finite,
        checkpoint=False,
    )


def test_check_finite_grads_stops_before_a_nan_gradient_is_applied(tmp_path):
    learn = sqrt_learner(tmp_path, "grads")
    with pytest.raises(
        FloatingPointError, match=r"gradients of model\.w are not finite.*still finite"
    ):
        learn.fit(1)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_the_loss_guard_does_not_claim_finite_weights_after_a_nan_gradient(tmp_path):
    learn = sqrt_learner(tmp_path, True)
    with pytest.raises(FloatingPointError, match=r"the weights already hold NaN/inf \(model\.w"):
        learn.fit(1)


class LitNaN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y) * (float("nan") if batch_idx == 2 else 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_lightning_module_gets_the_guard_too(tmp_path):
    learn = Learner(
        LitNaN(),
        (make_loaders()[0], None),
        path=tmp_path,
        logger=False,
        enable_progress_bar=False,
        splitter=lambda m: three_groups(m.net),
    )
    with (
        pytest.warns(UserWarning, match="superseded"),
        pytest.raises(FloatingPointError, match="loss is nan at optimizer step 2"),
    ):
        learn.fit(1)


# ------------------------------------------------------------------------------------------------
# SIGTERM
# ------------------------------------------------------------------------------------------------

SIGTERMED = """
    import os, signal, sys
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Callback
    from difflr import Learner
    from tests.helpers import make_loaders, make_model, three_groups

    class Term(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGTERM)

    learn = Learner(make_model(), make_loaders(), F.cross_entropy, splitter=three_groups,
                    path=sys.argv[1], logger=False, enable_progress_bar=False, callbacks=[Term()])
    try:
        learn.fit_one_cycle(4, 1e-2)
    except KeyboardInterrupt:
        print("caught a KeyboardInterrupt: training goes on")
    print("after the fit")
    """


@pytest.mark.parametrize(("batch", "epochs_saved"), [(2, 1), (5, 2)])
def test_sigterm_stops_after_the_batch_keeps_the_finished_epochs_and_exits(
    tmp_path, batch, epochs_saved
):
    # Mid-epoch (batch 2 of 6) the running epoch is given up: Lightning restarts a plain loader
    # at its first batch, so only an epoch end resumes exactly. In the last batch, the epoch's
    # training has finished and is saved before Lightning stops in the validation.
    result = run_script(SIGTERMED, str(tmp_path), str(batch))
    assert result.returncode == 128 + signal.SIGTERM, result.stdout + result.stderr
    assert "caught" not in result.stdout and "after the fit" not in result.stdout
    assert "SIGTERM received" in result.stderr and "ckpt_path='last'" in result.stderr
    assert read_fit_state(tmp_path / "checkpoints" / "last.ckpt").epochs_done == epochs_saved
    resumed = make_learner(tmp_path)
    resumed.fit_one_cycle(4, 1e-2, ckpt_path="last")
    assert len(resumed.recorder.lrs) == 4 * 6
    assert np.isfinite(resumed.recorder.losses).all()


def test_a_checkpoint_of_three_groups_into_two_is_refused_naming_the_groups(tmp_path):
    crashed_learner(tmp_path, lambda L: L.fit_one_cycle(3, 1e-2))
    two = make_learner(tmp_path, splitter=lambda m: [m[:5], m[5]])
    with pytest.raises(ValueError, match="groups has 3 entries in the checkpoint, 2 in this call"):
        two.fit_one_cycle(3, 1e-2, ckpt_path="last")


# ------------------------------------------------------------------------------------------------
# Issue 25: every promise of docs/checkpoints.md kept under faults
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dirpath", [None, "checkpoints"])
def test_a_user_checkpoint_into_difflrs_folder_is_refused_before_training(tmp_path, dirpath):
    # Without a logger Lightning puts a ModelCheckpoint without dirpath in
    # default_root_dir/checkpoints: its last.ckpt replaced difflr's (NaN weights included).
    mine = ModelCheckpoint(dirpath=dirpath and tmp_path / dirpath, save_last=True)
    learn = make_learner(tmp_path, callbacks=[mine])
    before = weights(learn.model)
    with pytest.raises(ValueError, match=r"difflr's own folder.*ModelCheckpoint\(dirpath=\.\.\.\)"):
        learn.fit(1)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


def resumed_matches_full(tmp_path, crash_epoch=2, **kwargs) -> None:
    """A run crashed at (crash_epoch, batch 1), resumed by a fresh Learner, ends where the
    uninterrupted one does, bit for bit (shuffling loader and dropout)."""

    def learner(path, **more):
        return make_learner(
            path,
            **dropout_run(),
            **kwargs,
            **more,
        )

    torch.manual_seed(1)
    full = learner(tmp_path / "full")
    full.fit_one_cycle(4, 1e-2)
    torch.manual_seed(1)
    crashed = learner(tmp_path / "run", callbacks=[Crash(epoch=crash_epoch, batch=1)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit_one_cycle(4, 1e-2)
    torch.manual_seed(123)
    resumed = learner(tmp_path / "run")
    resumed.fit_one_cycle(4, 1e-2, ckpt_path="last")
    for key, value in weights(full.model).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


@pytest.mark.parametrize(
    "switch", [{"val_check_interval": 0.5}, {"check_val_every_n_epoch": 2}], ids=str
)
def test_validation_switches_keep_the_resume_bit_for_bit(tmp_path, switch):
    # last.ckpt is written at each epoch's end whatever the validation schedule.
    resumed_matches_full(tmp_path, crash_epoch=3, **switch)


def test_a_checkpoint_written_mid_epoch_is_refused_naming_why(tmp_path):
    mine = ModelCheckpoint(dirpath=tmp_path / "mine", every_n_train_steps=2, save_top_k=-1)
    learn = make_learner(tmp_path, callbacks=[mine, Crash(epoch=2, batch=1)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        learn.fit_one_cycle(3, 1e-2)
    learn.callbacks.clear()
    mid = tmp_path / "mine" / "epoch=1-step=8.ckpt"  # batch 2 of 6 in epoch 1
    assert mid.is_file()
    with pytest.raises(ValueError, match="middle of an epoch"):
        learn.fit_one_cycle(3, 1e-2, ckpt_path=mid)


def test_a_loader_with_its_own_generator_resumes_bit_for_bit(tmp_path):
    def learner(path, **more):
        train, valid = make_loaders()
        own = torch.Generator().manual_seed(0)  # the reproducibility idiom
        loader = DataLoader(train.dataset, batch_size=16, shuffle=True, generator=own)
        return make_learner(path, data=(loader, valid), **more)

    full = learner(tmp_path / "full")
    full.fit_one_cycle(3, 1e-2)
    crashed = learner(tmp_path / "run", callbacks=[Crash(epoch=2, batch=1)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit_one_cycle(3, 1e-2)
    resumed = learner(tmp_path / "run")
    resumed.fit_one_cycle(3, 1e-2, ckpt_path="last")
    for key, value in weights(full.model).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def flip_a_tensor_byte(file: Path, tensor: torch.Tensor) -> None:
    """Flip one bit inside ``tensor``'s bytes in ``file`` (the zip stays intact: torch stores
    tensors uncompressed and does not check the records' CRC)."""
    data = bytearray(file.read_bytes())
    where = data.find(tensor.detach().numpy().tobytes())
    assert where > 0
    data[where + 5] ^= 0x10
    file.write_bytes(bytes(data))


def test_a_bit_flipped_in_a_checkpoint_tensor_is_refused_naming_the_file(tmp_path):
    learn = crashed_learner(tmp_path, lambda L: L.fit_one_cycle(3, 1e-2))
    last = tmp_path / "checkpoints" / "last.ckpt"
    flip_a_tensor_byte(last, safe_load(last)["state_dict"]["model.3.weight"])
    before = weights(learn.model)
    with pytest.raises(UnreadableFileError, match=r"last\.ckpt is corrupt.*checksum"):
        learn.fit_one_cycle(3, 1e-2, ckpt_path="last")
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


def test_a_bit_flipped_in_a_saved_state_is_refused(tmp_path):
    learn = make_learner(tmp_path)
    file = learn.save("state")
    flip_a_tensor_byte(file, learn.model[3].weight)
    with pytest.raises(UnreadableFileError, match=r"state\.pth is corrupt"):
        learn.load("state")


def test_random_bytes_are_unreadable_files_on_every_route(tmp_path):
    learn = make_learner(tmp_path)
    rng = np.random.default_rng(0)
    files = [b"\x85", b"PK\x03\x04", *(rng.bytes(int(rng.integers(1, 400))) for _ in range(150))]
    for i, content in enumerate(files):
        file = tmp_path / f"random{i}.pth"
        file.write_bytes(content)
        with pytest.raises(UnreadableFileError, match=f"random{i}"):
            safe_load(file)
    with pytest.raises(UnreadableFileError):
        learn.load(tmp_path / "random0.pth")
    with pytest.raises(UnreadableFileError):
        learn.fit(1, ckpt_path=tmp_path / "random0.pth")


def test_a_new_learner_resuming_another_learners_checkpoint_is_warned_by_name(tmp_path):
    crashed_learner(tmp_path, lambda L: L.fit_one_cycle(3, 1e-2))
    again = make_learner(tmp_path)  # re-created after the crash, in the same session
    with pytest.warns(UserWarning, match=r"written by another Learner of this process .*2 epoch"):
        again.fit_one_cycle(3, 1e-2, ckpt_path="last")
    assert len(again.recorder.lrs) == 18  # the recorder of all 3 epochs, the last one resumed


@pytest.mark.parametrize(
    ("other", "words"),
    [
        ({"wd_bn_bias": True}, "optimizer.param_groups"),
        ({"opt_func": lambda groups, lr: torch.optim.SGD(groups, lr=lr)}, "optimizer.type"),
    ],
    ids=["wd_bn_bias", "opt_func"],
)
def test_a_resume_with_another_optimizer_is_refused_before_anything_changes(tmp_path, other, words):
    crashed_learner(tmp_path, lambda L: L.fit_one_cycle(3, 1e-2))
    learn = make_learner(tmp_path, **other)
    before = weights(learn.model)
    with pytest.raises(ValueError, match=words):
        learn.fit_one_cycle(3, 1e-2, ckpt_path="last")
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda r: r.update(stage=5), r"stage is 5, expected an int in \[0, 1\)"),
        (lambda r: r.update(stage=-1), r"stage is -1"),
        (lambda r: r.update(epochs_done=7), r"epochs_done is 7"),
        (lambda r: r.update(frozen=["yes"]), r"frozen is \['yes'\]"),
        (lambda r: r["rng"]["numpy"].__setitem__(1, torch.zeros(3)), r"RNG record is malformed"),
        (lambda r: r["rng"].__setitem__("python", [3, [1, 2], None]), r"RNG record is malformed"),
    ],
    ids=["stage5", "stage-1", "epochs", "frozen", "numpy", "python"],
)
def test_an_edited_fit_record_is_refused_naming_the_field(tmp_path, edit, words):
    learn = crashed_learner(tmp_path, lambda L: L.fit_one_cycle(3, 1e-2))
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint.pop("difflr.checksum", None)  # an editor that knows to drop the checksum
    edit(checkpoint["difflr"])
    torch.save(checkpoint, last)
    before = weights(learn.model)
    with pytest.raises(ValueError, match=words):
        learn.fit_one_cycle(3, 1e-2, ckpt_path="last")
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


SIGNALLED = """
    import os, signal, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from lightning.pytorch.callbacks import Callback
    from tests.helpers import make_learner, make_loaders, make_model

    path, where, at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Term(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if where == "train" and trainer.current_epoch == 1 and batch_idx == at:
                os.kill(os.getpid(), signal.SIGTERM)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *rest):
            if where == "val" and trainer.current_epoch == 1 and batch_idx == at:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.manual_seed(1)  # the order of the test's uninterrupted run: seed, model, loaders
    model = make_model()
    model.insert(4, nn.Dropout(0.3))
    train, valid = make_loaders()
    learn = make_learner(path, model=model,
                         data=(DataLoader(train.dataset, batch_size=16, shuffle=True), valid),
                         splitter=lambda m: [m[:3], m[3:6], m[6]], callbacks=[Term()])
    try:
        learn.fit_one_cycle(4, 1e-2)
    except KeyboardInterrupt:
        print("caught a KeyboardInterrupt: training goes on")
    print("after the fit")
    """


@pytest.mark.parametrize(("where", "at"), [("train", 5), ("val", 1)], ids=["last-batch", "val"])
def test_sigterm_at_an_epochs_end_saves_it_as_a_normal_epoch_end(tmp_path, where, at):
    # SIGTERM in the last training batch or in the epoch-end validation: the epoch (and its
    # validation) finishes and is saved as at any epoch end, so the resume is bit-identical.
    torch.manual_seed(1)
    full = make_learner(
        tmp_path / "full",
        **dropout_run(),
    )
    full.fit_one_cycle(4, 1e-2)
    result = run_script(SIGNALLED, tmp_path / "run", where, at)
    assert result.returncode == 128 + signal.SIGTERM, result.stdout + result.stderr
    assert "after the fit" not in result.stdout
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["difflr"]["epochs_done"] == 2
    torch.manual_seed(123)
    resumed = make_learner(
        tmp_path / "run",
        **dropout_run(),
    )
    resumed.fit_one_cycle(4, 1e-2, ckpt_path="last")
    for key, value in weights(full.model).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


EVALUATING = """
    import os, signal, sys
    from lightning.pytorch.callbacks import Callback
    from tests.helpers import make_learner

    what, sig = sys.argv[1], getattr(signal, sys.argv[2])

    class Send(Callback):
        def on_validation_batch_start(self, trainer, *args):
            if what == "validate" and not trainer.sanity_checking:
                os.kill(os.getpid(), sig)

        def on_predict_batch_start(self, trainer, *args):
            os.kill(os.getpid(), sig)

    learn = make_learner(".", checkpoint=False)
    learn.callbacks.append(Send())
    learn.model.train()
    try:
        learn.validate() if what == "validate" else learn.get_preds()
    except KeyboardInterrupt as error:
        modes = {m.training for m in learn.model.modules()}
        print(f"KeyboardInterrupt: {error}; training modes {modes}")
    print("after", what)
    """


@pytest.mark.parametrize("what", ["validate", "get_preds"])
def test_sigterm_during_an_evaluation_exits_with_143(tmp_path, what):
    result = run_script(EVALUATING, what, "SIGTERM")
    assert result.returncode == 128 + signal.SIGTERM, result.stdout + result.stderr
    assert "after" not in result.stdout and "KeyboardInterrupt" not in result.stdout
    assert f"SIGTERM received, {what.replace('get_preds', 'predict')} stopped" in result.stderr


@pytest.mark.parametrize("what", ["validate", "get_preds"])
def test_ctrl_c_during_an_evaluation_puts_the_train_modes_back(tmp_path, what):
    result = run_script(EVALUATING, what, "SIGINT")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interrupted; the model is unchanged.; training modes {True}" in result.stdout


class Empty(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def test_an_empty_iterable_dataset_is_refused_by_fit_and_validate(tmp_path):
    empty = DataLoader(Empty(), batch_size=4)
    learn = make_learner(tmp_path, data=(empty, empty), limit_train_batches=3)
    with pytest.raises(ValueError, match="yielded no batch in epoch 0"):
        learn.fit(1)
    with pytest.raises(ValueError, match="validate read no batch"):
        learn.validate()


def test_numpy_integers_are_integers_everywhere_an_int_is_taken(tmp_path):
    learn = make_learner(
        tmp_path, accumulate_grad_batches=np.int64(2), limit_train_batches=np.int64(4)
    )
    learn.freeze_to(np.int64(1))
    learn.fit_one_cycle(np.int64(2), 1e-2)
    learn.fine_tune(np.int64(1), freeze_epochs=np.int64(1))
    assert learn.frozen == [False, False, False]
    assert len(learn.recorder.lrs) == 4  # 2 stages of 1 epoch: 4 batches, 2 per optimizer step


def test_a_fit_with_nothing_trainable_is_refused_before_training(tmp_path):
    learn = make_learner(tmp_path, train_bn=False)
    with pytest.warns(UserWarning, match="every layer group is frozen"):
        learn.freeze_to(3)
    before = weights(learn.model)
    with pytest.raises(ValueError, match="nothing would train: every parameter is frozen"):
        learn.fit(1)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


def test_the_nan_guard_puts_back_the_batchnorm_batch_counter(tmp_path):
    counts = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            counts.append(int(pl_module.model[1].num_batches_tracked))

    learn = make_learner(tmp_path, data=inf_batch_loaders(), checkpoint=False, callbacks=[Spy()])
    with pytest.raises(FloatingPointError):
        learn.fit(1)
    # momentum=None divides the running average by it: the failing batch 1 must not count.
    assert counts == [1] and int(learn.model[1].num_batches_tracked) == 1
