"""DDP with 2 CPU processes (gloo): the replicas stay identical, frozen groups stay untouched, one
rank decides for lr_find, and only rank 0 logs.

``tests/ddp_script.py`` runs once per session (about 30 s on 2 cores) in a subprocess with
``strategy="ddp"``; Lightning's script launcher starts its rank 1. The tests read what each rank
saved. The pure helpers of ``difflr.training.distributed`` are tested in this process; the
launchers that fork workers for each call (``ddp_notebook``) are ``tests/test_handback.py``'s.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from difflr import expand_lrs, valley
from difflr.policy.schedules import one_cycle_lr
from difflr.policy.suggestions import make_suggestions
from difflr.training.distributed import batches_per_process, decide_on_rank_zero, planned_world_size
from tests import ddp_script
from tests.helpers import make_loaders, make_model

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(ddp_script.__file__).resolve()
#: Seconds before the run counts as hung (a rank waiting for the other), then both are killed.
TIMEOUT = 300
#: Environment variables that would make Lightning think an outer launcher (torchrun, SLURM,
#: LSF, MPI) started the processes, so that it would not start rank 1 itself.
OUTER_LAUNCHER_PREFIXES = ("SLURM_", "LSB_", "JSM_", "OMPI_", "PMI_", "TORCHELASTIC_")
OUTER_LAUNCHER_VARS = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
}

STEM_LINEAR = ("model.0.weight", "model.0.bias")
STEM_NORM = ("model.1.weight", "model.1.bias")
BODY = ("model.3.weight", "model.3.bias")
HEAD = ("model.5.weight", "model.5.bias")


@dataclass
class DDPRun:
    out: Path
    output: str  # stdout and stderr of both ranks
    ranks: list[dict[str, Any]]  # what each rank saved, by global rank


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> DDPRun:
    out = tmp_path_factory.mktemp("ddp")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in OUTER_LAUNCHER_VARS and not k.startswith(OUTER_LAUNCHER_PREFIXES)
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # A session of its own, so that a hung run can be ended with both of its ranks.
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        # Returns once rank 1 (which shares the pipe) has exited too.
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the DDP run did not end within {TIMEOUT} s:\n{output[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"the DDP run failed (exit {process.returncode}):\n{output[-6000:]}")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return DDPRun(out, output, ranks)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def unchanged(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in start if torch.equal(start[k], end[k])}


def fits(run: DDPRun, name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The Trainers of one public call, as (rank 0's record, rank 1's record) pairs."""
    return list(zip(run.ranks[0][name]["fits"], run.ranks[1][name]["fits"], strict=True))


# --------------------------------------------------------------------------------- the run
def test_both_ranks_ran_in_one_process_group(run: DDPRun) -> None:
    assert [r["rank"] for r in run.ranks] == [0, 1]
    assert [r["world_size"] for r in run.ranks] == [2, 2]
    assert run.ranks[0]["pid"] != run.ranks[1]["pid"]


@pytest.mark.parametrize("call", ["head", "unfrozen", "fine_tune", "stages"])
def test_every_rank_ends_every_fit_bit_identical(run: DDPRun, call: str) -> None:
    for rank0, rank1 in fits(run, call):
        assert max_difference(rank0["start"], rank1["start"]) == 0
        assert max_difference(rank0["end"], rank1["end"]) == 0  # parameters and buffers


def test_a_fit_without_validation_ends_with_identical_batchnorm_statistics(run: DDPRun) -> None:
    # No validation forward re-broadcasts the buffers after the last training step; the
    # Learner's SyncBuffers callback does.
    rank0, rank1 = (r["no_valid"]["final"] for r in run.ranks)
    assert max_difference(rank0, rank1) == 0


def test_the_comparison_sees_replicas_that_drift(run: DDPRun) -> None:
    # Control: params unfrozen inside one fit were not registered by DDP, so each rank trains
    # them on its own shard. The bit-for-bit checks above would catch that.
    assert max_difference(run.ranks[0]["control"], run.ranks[1]["control"]) > 1e-4


def test_ddp_wraps_only_the_trainable_params_without_find_unused_parameters(run: DDPRun) -> None:
    for call in ("head", "unfrozen", "fine_tune", "stages"):
        for rank0, rank1 in fits(run, call):
            for record in (rank0, rank1):
                assert record["wrapper"] == "DistributedDataParallel"
                assert record["find_unused_parameters"] is False
    head = run.ranks[0]["head"]["fits"][0]
    assert head["trainable"] == sorted(STEM_NORM + HEAD)  # frozen before DDP wraps the model


def test_the_head_only_fit_leaves_the_frozen_groups_untouched(run: DDPRun) -> None:
    for record in run.ranks:
        fit = record["head"]["fits"][0]
        same = unchanged(fit["start"], fit["end"])
        assert set(STEM_LINEAR + BODY) <= same
        # The head trains, and the stem's BatchNorm too (train_bn=True).
        assert not set(HEAD + STEM_NORM) & same


def test_the_unfrozen_fit_trains_every_group(run: DDPRun) -> None:
    for record in run.ranks:
        fit = record["unfrozen"]["fits"][0]
        assert not set(STEM_LINEAR + STEM_NORM + BODY + HEAD) & unchanged(fit["start"], fit["end"])


def test_fine_tune_trains_the_head_then_everything(run: DDPRun) -> None:
    for record in run.ranks:
        frozen, unfrozen = record["fine_tune"]["fits"]
        assert set(STEM_LINEAR + BODY) <= unchanged(frozen["start"], frozen["end"])
        assert not set(HEAD) & unchanged(frozen["start"], frozen["end"])
        assert not set(STEM_LINEAR + BODY + HEAD) & unchanged(unfrozen["start"], unfrozen["end"])
        assert record["fine_tune"]["trainable"] == [[True, False, True], [True, True, True]]


def test_fit_stages_unfreezes_one_group_per_stage(run: DDPRun) -> None:
    trains = [set(HEAD), set(BODY + HEAD), set(STEM_LINEAR + BODY + HEAD)]
    everything = set(STEM_LINEAR + BODY + HEAD)
    for record in run.ranks:
        stages = record["stages"]["fits"]
        assert len(stages) == len(ddp_script.STAGES)
        for stage, expected in zip(stages, trains, strict=True):
            same = unchanged(stage["start"], stage["end"])
            assert everything - expected <= same
            assert not expected & same


# --------------------------------------------------------------------------------- steps
def test_the_schedule_counts_each_ranks_optimizer_steps(run: DDPRun) -> None:
    per_rank = run.ranks[0]["n_batches"] // 2  # the DistributedSampler halves each epoch
    for record in run.ranks:
        for call, epochs, lr_max in (
            ("head", ddp_script.HEAD_EPOCHS, 1e-2),
            ("unfrozen", ddp_script.UNFROZEN_EPOCHS, slice(1e-4, 1e-2)),
        ):
            fit = record[call]["fits"][0]
            assert fit["num_training_batches"] == per_rank
            n_steps = epochs * per_rank
            assert fit["estimated_stepping_batches"] == n_steps
            # The whole one-cycle, step i of N at pct = i / N, for every group.
            sched = one_cycle_lr(np.array(expand_lrs(lr_max, 3)))
            expected = np.array([sched(i / n_steps) for i in range(n_steps)])
            np.testing.assert_allclose(record[call]["lrs"], expected, rtol=1e-12)
        assert record["stages"]["boundaries"] == [0, per_rank, 2 * per_rank]


def test_the_preview_shows_the_steps_each_rank_makes(run: DDPRun) -> None:
    for record in run.ranks:
        np.testing.assert_array_equal(record["head"]["preview"], record["head"]["lrs"])


# --------------------------------------------------------------------------------- after the fit
def test_get_preds_gives_every_rank_each_item_once_in_dataset_order(run: DDPRun) -> None:
    x, y = (t[: ddp_script.PREDS_ITEMS] for t in make_loaders()[1].dataset.tensors)
    model = make_model()
    final = run.ranks[0]["after_fit"]["state"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in final.items()})
    with torch.no_grad():
        outputs = model.eval()(x)
    for record in run.ranks:
        inputs, preds, targets, losses = record["after_fit"]["get_preds"]
        # 95 items in shards of 48 and 47: none missing, no padding item twice, in order.
        assert torch.equal(inputs, x) and torch.equal(targets, y)
        torch.testing.assert_close(preds, outputs.softmax(1))
        torch.testing.assert_close(losses, F.cross_entropy(outputs, y, reduction="none"))


def test_validate_gives_every_rank_the_epoch_tables_last_row(run: DDPRun) -> None:
    for record in run.ranks:
        row = record["unfrozen"]["values"][-1]
        assert record["after_fit"]["validate"] == {
            "valid_loss": pytest.approx(row["valid_loss"], rel=1e-6),
            "accuracy": pytest.approx(row["accuracy"]),
        }


# --------------------------------------------------------------------------------- lr_find
def stop_step(losses: np.ndarray, factor: float = 4.0) -> int | None:
    """The number of steps after which the sweep's stop rule fires on this curve."""
    best = math.inf
    for i, loss in enumerate(losses):
        if not math.isfinite(loss) or loss > factor * best:
            return i + 1
        best = min(best, loss)
    return None


def test_lr_find_gives_every_rank_rank_zeros_suggestions(run: DDPRun) -> None:
    rank0, rank1 = (r["lr_find"] for r in run.ranks)
    assert rank0["fields"] == rank1["fields"] == ("valley", "steep", "minimum")
    assert rank0["suggested"] == rank1["suggested"]
    assert rank0["points"] == rank1["points"]
    assert all(math.isfinite(lr) and lr > 0 for lr in rank0["suggested"])
    # Each rank recorded the loss of its own shard; the suggestions are rank 0's.
    assert not np.array_equal(rank0["losses"], rank1["losses"])
    n = min(len(rank0["lrs"]), len(rank0["losses"]))
    own, _ = make_suggestions(
        valley,
        rank0["lrs"][:n],
        rank0["losses"][:n],
        skip_start=ddp_script.LR_FIND_ITERATIONS // 10,
    )
    assert rank0["suggested"][0] == own.valley


def test_lr_find_stops_every_rank_at_rank_zeros_step(run: DDPRun) -> None:
    rank0, rank1 = (r["lr_find"] for r in run.ranks)
    assert rank0["n_steps"] == rank1["n_steps"] < ddp_script.LR_FIND_ITERATIONS
    assert stop_step(rank0["losses"]) == rank0["n_steps"]


def test_lr_find_follows_rank_zero_when_another_rank_would_stop_alone(run: DDPRun) -> None:
    rank0, rank1 = (r["lr_find_spike"] for r in run.ranks)
    # Rank 1's own curve jumps at SPIKE_AT, where its rule alone would have stopped it.
    assert stop_step(rank1["losses"]) == ddp_script.SPIKE_AT
    assert stop_step(rank0["losses"]) == rank0["n_steps"] == rank1["n_steps"]
    assert rank0["n_steps"] > ddp_script.SPIKE_AT
    assert rank0["suggested"] == rank1["suggested"]


def test_lr_find_restores_every_rank(run: DDPRun) -> None:
    for record in run.ranks:
        result = record["lr_find"]
        assert max_difference(result["before"], result["after"]) == 0
        assert result["opt_equal"]
        assert result["flags_equal"]
    assert max_difference(run.ranks[0]["lr_find"]["after"], run.ranks[1]["lr_find"]["after"]) == 0


# --------------------------------------------------------------------------------- refusals
def test_gradual_unfreezing_refuses_to_start_under_ddp(run: DDPRun) -> None:
    for record in run.ranks:
        message = record["gradual_unfreezing"]
        assert message is not None
        assert "2 processes" in message and "fit_stages" in message
        assert not record["gradual_unfreezing_froze"]  # refused before freezing anything


# --------------------------------------------------------------------------------- rank 0 only
def test_validation_loss_and_metrics_cover_every_rank(run: DDPRun) -> None:
    rank0, rank1 = (r["unfrozen"]["values"] for r in run.ranks)
    for row0, row1 in zip(rank0, rank1, strict=True):
        assert row0["valid_loss"] == row1["valid_loss"]
        assert row0["accuracy"] == row1["accuracy"]
    # The last epoch's numbers are those of the whole validation set, for the final model.
    model = make_model()
    final = run.ranks[0]["unfrozen"]["fits"][0]["end"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in final.items()})
    model.eval()
    x, y = make_loaders()[1].dataset.tensors
    with torch.no_grad():
        preds = model(x)
    assert rank0[-1]["valid_loss"] == pytest.approx(F.cross_entropy(preds, y).item(), rel=1e-5)
    assert rank0[-1]["accuracy"] == pytest.approx((preds.argmax(1) == y).float().mean().item())


def test_only_rank_zero_writes_tensorboard_events(run: DDPRun) -> None:
    logs = run.out / "run" / "lightning_logs"
    assert [p.name for p in logs.iterdir()] == ["version_0"]
    events = sorted(logs.glob("version_0/events.out.tfevents.*"))
    # One event file per Trainer that logged: 2 one-cycles, fine_tune's 2, fit_stages' 3.
    assert len(events) == 2 + 2 + len(ddp_script.STAGES)
    writers = {int(p.name.split(".")[-2]) for p in events}
    assert writers == {run.ranks[0]["pid"]}


ROW = re.compile(r"^\s*\d+(\s+(-?\d+(\.\d+)?(e[-+]\d+)?|—))+\s+\d+:\d\d(:\d\d)?\s*$")


def test_only_rank_zero_prints_the_epoch_table(run: DDPRun) -> None:
    lines = run.output.splitlines()
    headers = [line for line in lines if line.split()[:2] == ["epoch", "train_loss"]]
    rows = [line for line in lines if ROW.match(line)]
    # One table per public call of each Learner: 4 on the first, 1 on the one without validation.
    assert len(headers) == 5
    epochs = ddp_script.HEAD_EPOCHS + ddp_script.UNFROZEN_EPOCHS + 2 + len(ddp_script.STAGES) + 1
    assert len(rows) == epochs


# --------------------------------------------------------------------------------- helpers
def test_decide_on_rank_zero_in_one_process_returns_the_decision() -> None:
    import lightning.pytorch as pl

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert decide_on_rank_zero(trainer, lambda: {"valley": 1e-3}) == {"valley": 1e-3}
    with pytest.raises(KeyError):
        decide_on_rank_zero(trainer, lambda: {}["missing"])


@pytest.mark.parametrize(
    ("n", "batch_size", "drop_last", "world_size", "expected"),
    [
        (96, 16, False, 1, 6),
        (96, 16, False, 2, 3),
        (100, 16, False, 2, 4),  # 50 samples each: 3 full batches and one of 2
        (100, 16, False, 4, 2),
        (96, 16, True, 4, 1),  # 24 samples each: one full batch, the rest dropped
        (100, 16, True, 2, 3),
    ],
)
def test_batches_per_process_follows_the_distributed_sampler(
    n: int, batch_size: int, drop_last: bool, world_size: int, expected: int
) -> None:
    dataset = TensorDataset(torch.zeros(n, 1))
    loader = DataLoader(dataset, batch_size=batch_size, drop_last=drop_last)
    assert batches_per_process(loader, world_size) == expected
    # What the sampler Lightning installs gives, batched the same way.
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=0, shuffle=False)
    sharded = DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, sampler=sampler)
    assert len(sharded) == expected
    assert batches_per_process(sharded, world_size) == expected  # already sharded
    assert batches_per_process(loader, world_size, use_distributed_sampler=False) == len(loader)


def test_planned_world_size_reads_the_strategy_and_devices() -> None:
    assert planned_world_size({}) in (1, torch.cuda.device_count())
    assert planned_world_size({"accelerator": "cpu", "devices": 1}) == 1
    assert planned_world_size({"strategy": "ddp", "accelerator": "cpu", "devices": 2}) == 2
    assert (
        planned_world_size({"strategy": "ddp", "accelerator": "cpu", "devices": 2, "num_nodes": 2})
        == 4
    )
