"""Sharded fine-tuning through Lightning's ``ModelParallelStrategy`` (FSDP2), on CPU.

``tests/sharded_script.py`` runs once per session in a subprocess with 2 processes (gloo), on a
plain ``nn.Module`` of repeated blocks and a tiny LLaMA-like decoder, and once in one process on
the same global batches (the reference). The tests compare what each rank saved with the
reference, and check the sharded parts that have no reference (``lr_find``'s exact restore,
save/load, a resumed fit). The refusals and the strategy copy are checked in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn

from difflr.groups.blocks import BlockSplitter
from difflr.training.sharding import (
    atomic_folder_saves,
    check_strategy,
    rank_zero_decides,
    shard_blocks,
)
from tests import sharded_script
from tests.helpers import ROOT, make_learner

SCRIPT = Path(sharded_script.__file__).resolve()
TIMEOUT = 400
KINDS = sharded_script.KINDS
#: Float tolerance of a 2-process FSDP2 run against one process (the order of the sums differs).
TOLERANCE = 1e-6


def _launch(out: Path, *extra: str) -> subprocess.Popen:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))
        and k not in {"LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a hung run is ended with both of its ranks
    )


def _wait(process: subprocess.Popen, what: str) -> None:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the {what} did not end within {TIMEOUT} s:\n{output[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"the {what} failed (exit {process.returncode}):\n{output[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sharded")
    sharded = _launch(out)
    _wait(_launch(out, "reference"), "one-process reference run")
    _wait(sharded, "2-process sharded run")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    reference = torch.load(out / "reference.pt", weights_only=False)
    return {"ranks": ranks, "reference": reference, "out": out}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-identical nested dicts of tensors (and plain values)."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not _equal(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fit", ["first", "second"])
def test_a_sharded_fit_equals_one_process_on_the_same_global_batches(runs, kind, fit) -> None:
    # first: fit_one_cycle(2, slice(lo, hi)) with the first two groups frozen; second: unfreeze()
    # and fit_one_cycle(1, ...), continuing from the weights and optimizer state the first left.
    sharded, one = runs["ranks"][0][kind][fit], runs["reference"][kind][fit]
    assert _max_difference(sharded["model"], one["model"]) < TOLERANCE
    assert sharded["opt"].keys() == one["opt"].keys()
    for index, state in one["opt"].items():
        assert _max_difference(sharded["opt"][index], state) < TOLERANCE


@pytest.mark.parametrize("fit", ["fine_tune", "layer_decay"])
def test_fine_tune_and_layer_decay_sharded_equal_one_process(runs, fit) -> None:
    sharded, one = runs["ranks"][0]["llama"][fit], runs["reference"]["llama"][fit]
    assert _max_difference(sharded["model"], one["model"]) < TOLERANCE
    for index, state in one["opt"].items():
        assert _max_difference(sharded["opt"][index], state) < TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_the_model_is_sharded_block_by_block_and_every_parameter_is_a_shard(runs, kind) -> None:
    rank0 = runs["ranks"][0][kind]
    expected = ["1", "2", "3"] if kind == "blocks" else ["model.layers.0", "model.layers.1"]
    assert rank0["blocks"] == expected
    assert all(rank0["first_local"]["dtensor"].values())
    # Each rank holds its own half of a parameter of 32 rows.
    name = "1.mlp.0.weight" if kind == "blocks" else "model.layers.0.mlp.gate_proj.weight"
    halves = [runs["ranks"][r][kind]["first_local"]["params"][name] for r in (0, 1)]
    assert [h.shape[0] for h in halves] == [16, 16]
    assert not torch.equal(halves[0], halves[1])


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_parameters_hold_no_optimizer_state_and_no_gradient(runs, kind) -> None:
    for rank in runs["ranks"]:
        local = rank[kind]["first_local"]
        frozen = [n for n, trains in local["requires_grad"].items() if not trains]
        assert frozen, "the first fit freezes two groups"
        for name in frozen:
            assert name not in local["opt_state"]
            assert local["grads"][name] is None
        for name in set(local["requires_grad"]) - set(frozen):
            assert name in local["opt_state"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_recorded_lrs_keep_the_slice_of_one_process(runs, kind) -> None:
    sharded, one = runs["ranks"][0][kind]["lrs"], runs["reference"][kind]["lrs"]
    assert sharded.shape == one.shape
    assert sharded == pytest.approx(one, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_validate_and_get_preds_equal_one_process(runs, kind) -> None:
    for rank in runs["ranks"]:
        assert rank[kind]["validate"]["valid_loss"] == pytest.approx(
            runs["reference"][kind]["validate"]["valid_loss"], abs=TOLERANCE
        )
        preds, targets = rank[kind]["preds"]
        one_preds, one_targets = runs["reference"][kind]["preds"]
        assert preds.shape == one_preds.shape  # every item once, on every rank
        assert (preds - one_preds).abs().max().item() < TOLERANCE
        assert torch.equal(targets, one_targets)  # in dataset order


@pytest.mark.parametrize("kind", KINDS)
def test_get_preds_reads_shards_of_unequal_length_without_waiting_forever(runs, kind) -> None:
    # 65 items in batches of 8: Lightning's prediction shards (33, 32 items) differ by a batch, and
    # a sharded forward is a collective; difflr reads equal, padded shards and keeps each item once.
    one_preds, one_targets = runs["reference"][kind]["uneven_preds"]
    assert len(one_preds) == sharded_script.UNEVEN
    for rank in runs["ranks"]:
        preds, targets = rank[kind]["uneven_preds"]
        assert preds.shape == one_preds.shape
        assert (preds - one_preds).abs().max().item() < TOLERANCE
        assert torch.equal(targets, one_targets)


def test_the_nan_guard_stops_every_rank_at_the_step_one_rank_sees_a_nan(runs) -> None:
    ranks = [rank["blocks"] for rank in runs["ranks"]]
    assert all(rank["nan_guard"] is not None for rank in ranks), "every rank raised"
    zero, one = (rank["nan_guard"][0] for rank in ranks)
    at = f"at optimizer step {sharded_script.NAN_AT} "
    assert zero.startswith("the training loss is not finite on another rank " + at)
    assert one.startswith("the training loss is nan " + at)
    for rank in ranks:
        assert rank["nan_guard_steps"] == sharded_script.NAN_AT  # the steps before it, no more
        weights = rank["nan_guard"][1]["params"].values()
        assert all(bool(torch.isfinite(w).all()) for w in weights)


@pytest.mark.parametrize("kind", KINDS)
def test_only_rank_zero_writes_tensorboard_events_with_every_groups_lr(runs, kind) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = runs["out"] / "sharded" / kind / "lightning_logs"
    assert [p.name for p in logs.iterdir()] == ["version_0"]
    events = sorted(logs.glob("version_0/events.out.tfevents.*"))
    # One file per Trainer that logged: 3 fits, and the LLaMA's fine_tune (2) and layer_decay
    # fit; lr_find, validate, get_preds do not log.
    assert len(events) == 3 + 3 * (kind == "llama")
    assert {int(p.name.split(".")[-2]) for p in events} == {runs["ranks"][0]["pid"]}
    tags = set()
    for file in events:
        accumulator = EventAccumulator(str(file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert "train_loss" in tags or "train_loss_step" in tags
    for group in runs["ranks"][0][kind]["groups"]:
        assert any(group in tag for tag in tags), (group, sorted(tags))


@pytest.mark.parametrize("kind", KINDS)
def test_lr_find_restores_every_ranks_shard_and_optimizer_state_exactly(runs, kind) -> None:
    for rank in runs["ranks"]:
        before, after, same_rng = rank[kind]["lr_find"]
        assert _equal(before, after)
        assert same_rng
    assert runs["ranks"][0][kind]["suggestion"] == runs["ranks"][1][kind]["suggestion"]


def test_lr_find_as_the_first_call_restores_the_initial_weights_into_the_shards(runs) -> None:
    after, initial = runs["ranks"][0]["blocks"]["lr_find_first"]
    assert _equal(after, initial)


@pytest.mark.parametrize("kind", KINDS)
def test_predict_export_and_a_disk_snapshot_are_refused_on_a_sharded_model(runs, kind) -> None:
    for rank in runs["ranks"]:
        refusals = rank[kind]["refusals"]
        assert "predict(x) is not supported on a sharded model" in refusals["predict"]
        assert "get_preds(dl) on every rank" in refusals["predict"]
        assert "export() is not supported on a sharded model" in refusals["export"]
        assert 'snapshot="memory"' in refusals["lr_find_disk"]


@pytest.mark.parametrize("kind", KINDS)
def test_load_puts_back_every_ranks_shard_from_the_gathered_save(runs, kind) -> None:
    for rank in runs["ranks"]:
        saved, changed, loaded, _ = rank[kind]["save_load"]
        assert not _equal(saved["params"], changed["params"])  # the fit in between trained
        assert _equal(saved["params"], loaded["params"])
        assert _equal(saved["opt_state"], loaded["opt_state"])


def test_a_resumed_sharded_fit_ends_bit_identical_to_the_whole_fit(runs) -> None:
    # The cut fit stopped after its first epoch's last.ckpt (the full state gathered on rank 0).
    for rank in runs["ranks"]:
        whole, resumed = rank["blocks"]["resume"]
        assert _equal(whole["params"], resumed["params"])
        assert _equal(whole["opt_state"], resumed["opt_state"])


def test_a_fit_resumes_from_a_distributed_checkpoint_folder_renamed_into_place(runs) -> None:
    # ModelParallelStrategy's default: each rank writes its shard into a folder written beside
    # last.ckpt and renamed over it once every rank is done; the fit record is in its meta.pt.
    for rank in runs["ranks"]:
        whole, resumed, written, inside = rank["blocks"]["resume_folder"]
        # No half-written folder left beside it (.claim is the folder lock's file: it stays).
        assert [name for name in written if name != ".claim"] == ["last.ckpt"]
        assert "meta.pt" in inside and ".metadata" in inside
        assert _equal(whole["params"], resumed["params"])
        assert _equal(whole["opt_state"], resumed["opt_state"])


# ------------------------------------------------------------------------------ in this process
@pytest.mark.parametrize(
    "strategy",
    [
        lambda: DDPStrategy(),
        lambda: ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        ),
    ],
    ids=["DDPStrategy", "ModelParallelStrategy"],
)
def test_a_strategy_instance_survives_a_fresh_trainer_per_call(tmp_path, strategy) -> None:
    # A Trainer attaches its accelerator to the instance; the next Trainer refused it with
    # "accelerator set through both strategy class and accelerator flag".
    given = strategy()
    learn = make_learner(tmp_path, accelerator="cpu", devices=2, strategy=given)
    first, second = learn.runner.trainer(), learn.runner.trainer()
    assert type(first.strategy) is type(second.strategy) is type(given)
    assert first.strategy is not second.strategy and first.strategy is not given
    assert given.accelerator is None  # the user's instance is untouched
    assert first.world_size == second.world_size == 2
    learn.preview_one_cycle(1)  # the preview counts processes with a copy too
    assert given.accelerator is None


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_cpu_offload"])
def test_fsdp1_is_refused_and_points_to_model_parallel_strategy(tmp_path, strategy) -> None:
    with pytest.raises(ValueError, match=r"FSDP1.*CUDA only.*ModelParallelStrategy"):
        make_learner(tmp_path, accelerator="cpu", devices=2, strategy=strategy)


def test_deepspeed_is_refused_with_the_reason(tmp_path) -> None:
    with pytest.raises(ValueError, match="DeepSpeed builds and steps its own optimizer"):
        make_learner(tmp_path, strategy="deepspeed_stage_2")


@pytest.mark.parametrize("tp", [2, "auto"])
def test_tensor_parallelism_is_refused(tp) -> None:
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=tp)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={tp!r}.*tensor_parallel_size=1"):
        check_strategy({"strategy": strategy})


def test_a_model_without_repeated_blocks_cannot_be_sharded_and_the_error_names_the_splitter() -> (
    None
):
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"cannot shard Sequential.*BlockSplitter\(trunk="):
        shard_blocks(mlp, mesh=None)
    with pytest.raises(ValueError, match="trunk='nowhere'"):
        shard_blocks(mlp, mesh=None, splitter=BlockSplitter(trunk="nowhere"))


def test_rank_zero_decides_in_one_process_by_deciding() -> None:
    assert rank_zero_decides(lambda: 7) == 7
    with pytest.raises(KeyError):
        rank_zero_decides(lambda: {}["missing"])


@pytest.mark.parametrize("own", [False, True], ids=["difflr-shards-it", "it-shards-itself"])
def test_a_users_lightning_module_is_sharded_and_trains_as_in_one_process(runs, own) -> None:
    # own=False: no configure_model, difflr shards the blocks and each child of the module;
    # own=True: its configure_model shards (once: the next Trainer finds it sharded), difflr
    # only re-targets the optimizer and the layer groups.
    sharded, one = runs["ranks"][0][f"module_own={own}"], runs["reference"][f"module_own={own}"]
    for fit in ("first", "second"):
        assert _max_difference(sharded[fit]["model"], one[fit]["model"]) < TOLERANCE
        assert sharded[fit]["opt"].keys() == one[fit]["opt"].keys()
        for index, state in one[fit]["opt"].items():
            assert _max_difference(sharded[fit]["opt"][index], state) < TOLERANCE
    assert all(sharded["local"]["dtensor"].values())
    assert sharded["blocks"] == ([] if own else ["net.1", "net.2", "net.3"])
    assert sharded["sharded_by_itself"] == (1 if own else None)


@pytest.mark.slow
def test_the_sharded_example_runs_on_two_processes(tmp_path) -> None:
    example = ROOT / "docs" / "examples" / "sharded_fine_tune.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        [sys.executable, str(example), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in done.stdout + done.stderr
    assert "valid_loss" in done.stdout
    saved = torch.load(tmp_path / "models" / "final.pth", weights_only=True)
    # The full state, gathered: every parameter at its whole size.
    assert saved["model"]["lm_head.weight"].shape == (256, 64)


def test_the_sharded_save_is_the_file_a_one_process_learner_loads(runs, tmp_path) -> None:
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    file = runs["out"] / "sharded" / "blocks" / "models" / "saved.pth"
    loader = DataLoader(sharded_script.make_dataset("blocks"), batch_size=8)
    model = sharded_script.make_model("blocks")
    learn = make_learner(tmp_path, model, (loader, None), F.cross_entropy, splitter=None)
    learn.load(file)  # checked against the model and its layer groups, optimizer state included
    gathered = runs["ranks"][0]["blocks"]["save_load"][3]  # the sharded Learner after its load
    assert _equal(learn.model.state_dict(), gathered["model"])
    assert learn.opt.state_dict()["state"].keys() == gathered["opt"].keys()


def test_a_checkpoint_folder_is_written_beside_the_target_and_renamed_over_it(tmp_path) -> None:
    target = tmp_path / "last.ckpt"
    target.mkdir()
    (target / "meta.pt").write_text("previous")
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    seen = []

    def write(checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        # What Lightning's save does: a folder at the path it is given, with the shards.
        seen.append((Path(path).parent, (target / "meta.pt").read_text()))
        Path(path).mkdir()
        (Path(path) / "meta.pt").write_text(checkpoint["epoch"])
        if checkpoint["epoch"] == "dies":
            raise OSError("disk full")

    strategy.save_checkpoint = write  # stands for Lightning's own, on difflr's copy
    atomic_folder_saves(strategy)
    strategy.save_checkpoint({"epoch": "new"}, target)
    assert seen == [(tmp_path, "previous")]  # written beside, the target untouched meanwhile
    assert (target / "meta.pt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    with pytest.raises(OSError, match="disk full"):
        strategy.save_checkpoint({"epoch": "dies"}, target)
    assert (target / "meta.pt").read_text() == "new"  # a write that dies leaves the last one


@pytest.mark.slow
def test_a_rank_killed_mid_fit_leaves_a_readable_checkpoint_and_the_resume_is_bit_identical(
    tmp_path,
) -> None:
    from difflr.training.checkpoints import read_fit_state

    whole = _launch(tmp_path, "whole")
    _wait(whole, "uninterrupted run")
    killed = _launch(tmp_path, "kill")
    try:
        killed.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:  # rank 0 waiting for the dead rank: end it
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate()
    assert killed.returncode != 0, "rank 1 was killed: the run cannot end well"
    assert not (tmp_path / "kill0.pt").exists()
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    record = read_fit_state(last)  # readable: the folder of the last finished epoch
    assert record["epochs_done"] == sharded_script.KILL_EPOCH
    _wait(_launch(tmp_path, "resume"), "resumed run")
    for r in (0, 1):
        expected = torch.load(tmp_path / f"whole{r}.pt", weights_only=False)
        resumed = torch.load(tmp_path / f"resume{r}.pt", weights_only=False)
        assert _equal(expected["params"], resumed["params"])
        assert _equal(expected["opt_state"], resumed["opt_state"])
