"""The Trainers a Learner builds: Lightning's switches mean what they mean there, and bad
settings are refused before anything trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
from torch.utils.data import DataLoader, IterableDataset

from tests.helpers import make_learner, run_script

ROOT = Path(__file__).resolve().parents[1]


def ckpt_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))


def test_enable_checkpointing_false_writes_no_checkpoint(tmp_path):
    learn = make_learner(tmp_path, enable_checkpointing=False)
    learn.fit(2)
    assert ckpt_files(tmp_path) == []


def test_enable_checkpointing_true_without_difflrs_gives_lightnings_default(tmp_path):
    learn = make_learner(tmp_path, checkpoint=False, enable_checkpointing=True)
    learn.fit(1)
    assert ckpt_files(tmp_path) == ["checkpoints/epoch=0-step=6.ckpt"]


def test_checkpoint_true_with_enable_checkpointing_false_is_refused():
    with pytest.raises(ValueError, match="pass one of them"):
        make_learner(".", checkpoint=True, enable_checkpointing=False)


def test_a_users_model_checkpoint_works_with_difflrs_off(tmp_path):
    mine = ModelCheckpoint(dirpath=tmp_path / "mine", filename="{epoch}")
    learn = make_learner(tmp_path, checkpoint=False, callbacks=[mine])
    learn.fit(2)
    assert ckpt_files(tmp_path) == ["mine/epoch=1.ckpt"]


def test_monitor_without_checkpointing_is_refused():
    with pytest.raises(ValueError, match=r"monitor='valid_loss' keeps path/checkpoints/best\.ckpt"):
        make_learner(".", checkpoint=False, monitor="valid_loss")


def test_the_users_switches_reach_every_trainer(tmp_path):
    learn = make_learner(
        tmp_path,
        enable_model_summary=True,
        num_sanity_val_steps=1,
        log_every_n_steps=3,
        gradient_clip_val=0.5,
    )
    learn.fit(1)
    trainer = learn.trainer
    assert any(isinstance(cb, ModelSummary) for cb in trainer.callbacks)
    assert trainer.num_sanity_val_steps == 1
    assert trainer.log_every_n_steps == 3
    assert trainer.gradient_clip_val == 0.5


def test_accumulate_grad_batches_zero_is_refused_at_once():
    with pytest.raises(ValueError, match=r"accumulate_grad_batches must be an int >= 1, got 0"):
        make_learner(".", accumulate_grad_batches=0)


def test_a_path_under_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    learn = make_learner(tmp_path / "file" / "run")
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(OSError, match=r"cannot hold the Learner's logs and checkpoints"):
        learn.fit(1)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
    assert learn.recorder.values == []


class Endless(IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(32):
            yield torch.randn(6, generator=generator), torch.tensor(1)


def test_a_loader_without_length_says_how_to_give_the_schedule_its_steps(tmp_path):
    learn = make_learner(tmp_path, data=(DataLoader(Endless(), batch_size=8), None))
    with pytest.raises(ValueError, match=r"no length .* limit_train_batches=<batches per epoch>"):
        learn.fit_one_cycle(1)
    learn = make_learner(
        tmp_path,
        data=(DataLoader(Endless(), batch_size=8), None),
        limit_train_batches=4,
        checkpoint=False,
    )
    learn.fit_one_cycle(1)
    assert len(learn.recorder.lrs) == 4


LOGS_ON_A_FULL_DISK = """
    import resource, signal, sys
    import torch.nn.functional as F
    from difflr import Learner
    from tests.helpers import make_loaders, make_model, three_groups
    learn = Learner(make_model(), make_loaders(), F.cross_entropy, splitter=three_groups,
                    path=sys.argv[1], enable_progress_bar=False, checkpoint=False)
    learn.fit(1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # the disk is full now
    try:
        learn.fit(3)
    except OSError as error:
        print("refused:", error)
    """


def test_a_full_disk_under_the_logs_names_the_folder_and_the_fix(tmp_path):
    result = run_script(LOGS_ON_A_FULL_DISK, str(tmp_path))
    assert "refused: " in result.stdout, result.stdout + result.stderr
    assert "could not write the logs in" in result.stdout
    assert "pass logger=False" in result.stdout
