"""Several devices from a notebook: ``strategy="ddp_notebook"``/``"ddp_fork"`` on 2 CPU processes.

Two runs at the same time (each is mostly a fresh Python process importing torch and Lightning):
``tests/fork_script.py`` calls a Learner with ``ddp_fork`` from a plain script, in full precision
and in ``bf16-mixed``; and a real Jupyter kernel (nbclient) does the same with ``ddp_notebook``.
In both, rank 0's worker writes what it holds at the start and end of each fit, and the tests
compare it with what the notebook's process holds after the call. The refusals and the pinned
Lightning internals are checked in this process.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests import fork_script
from tests.helpers import make_learner

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available()
    or "fork" not in torch.multiprocessing.get_all_start_methods(),
    reason="needs torch.distributed with the gloo backend, and fork",
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300
#: Environment variables that would make Lightning think an outer launcher started the processes.
OUTER_LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"}
OUTER_LAUNCHER_PREFIXES = ("SLURM_", "LSB_", "JSM_", "OMPI_", "PMI_", "TORCHELASTIC_")

KERNEL_CELLS = [
    """
import torch
from pathlib import Path
from tests.fork_script import make_tap, snapshot
from tests.helpers import make_learner
out = Path(OUT)
tap = make_tap(out)
learn = make_learner(out / "learner", accelerator="cpu", devices=2, strategy="ddp_notebook",
                     callbacks=[tap], enable_progress_bar=True)
""",
    """
learn.fit_one_cycle(2, slice(1e-3, 1e-2))
torch.save(snapshot(learn), out / "nb-fit0.pt")
""",
    """
tap.fits = 1
learn.fit_one_cycle(1, 1e-3)
torch.save(snapshot(learn), out / "nb-fit1.pt")
""",
    """
before = snapshot(learn)
suggested = learn.lr_find(num_it=12, show_plot=False)
torch.save({"before": before, "after": snapshot(learn), "suggested": suggested.valley,
            "n_steps": len(learn.recorder.lrs)}, out / "nb-lr_find.pt")
""",
    """
torch.save({"validate": learn.validate(), "preds": learn.get_preds()}, out / "nb-eval.pt")
""",
]


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in OUTER_LAUNCHER_VARS and not k.startswith(OUTER_LAUNCHER_PREFIXES)
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run_kernel(out: Path) -> Any:
    import nbclient
    import nbformat

    cells = [nbformat.v4.new_code_cell(f"OUT = {str(out)!r}"), *map(_code_cell, KERNEL_CELLS)]
    notebook = nbformat.v4.new_notebook(cells=cells)
    env = _env()
    with pytest.MonkeyPatch.context() as patch:  # the kernel inherits this process's environment
        for key in ("PYTHONPATH", "OMP_NUM_THREADS"):
            patch.setenv(key, env[key])
        for key in os.environ:
            if key in OUTER_LAUNCHER_VARS or key.startswith(OUTER_LAUNCHER_PREFIXES):
                patch.delenv(key)
        nbclient.NotebookClient(
            notebook,
            timeout=TIMEOUT,
            kernel_name="python3",
            resources={"metadata": {"path": str(out)}},
        ).execute()
    return notebook


def _code_cell(source: str) -> Any:
    import nbformat

    return nbformat.v4.new_code_cell(source.strip())


@dataclass
class Runs:
    out: Path
    script: subprocess.CompletedProcess[str]
    notebook: Any  # the executed notebook, an exception, or None without nbclient/ipykernel


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    out = tmp_path_factory.mktemp("fork")
    (out / "kernel").mkdir()
    has_kernel = all(importlib.util.find_spec(m) for m in ("nbclient", "nbformat", "ipykernel"))
    notebook: list[Any] = [None]

    def kernel() -> None:
        try:
            notebook[0] = _run_kernel(out / "kernel")
        except Exception as error:  # reported by the kernel tests, not by the script's
            notebook[0] = error

    thread = threading.Thread(target=kernel) if has_kernel else None
    if thread is not None:
        thread.start()
    script = subprocess.run(
        [sys.executable, str(Path(fork_script.__file__).resolve()), str(out / "script")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        env=_env(),
        start_new_session=True,  # its Ctrl-C goes to its own process group
    )
    if thread is not None:
        thread.join(TIMEOUT)
    return Runs(out, script, notebook[0])


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=False)


def _script(runs: Runs, precision: str) -> tuple[dict[str, Any], Path]:
    assert runs.script.returncode == 0, runs.script.stdout[-3000:] + runs.script.stderr[-5000:]
    folder = runs.out / "script" / precision
    return _load(folder / "parent.pt"), folder


def _notebook(runs: Runs) -> Path:
    if runs.notebook is None:
        pytest.skip("nbclient, nbformat and ipykernel run the kernel ([dev] extra)")
    if isinstance(runs.notebook, Exception):
        raise runs.notebook
    return runs.out / "kernel"


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-identical state dicts (model or optimizer), nested."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


PRECISIONS = pytest.mark.parametrize("precision", fork_script.PRECISIONS)


# ----------------------------------------------------------------------------- script, ddp_fork
@PRECISIONS
def test_after_a_fit_the_learner_holds_what_rank_zero_held(runs: Runs, precision: str) -> None:
    parent, folder = _script(runs, precision)
    rank0 = _load(folder / "rank0-fit0-end.pt")
    assert rank0["world_size"] == 2 and rank0["pid"] != parent["pid"]  # it ran in a worker
    fit = parent["fit0"]
    assert_same_state(fit["opt"], rank0["opt"])  # state and hyper-parameters
    assert all(s["step"] == 6 for s in fit["opt"]["state"].values())
    assert_same_state(fit["model"], rank0["model"])  # weights and BatchNorm statistics
    np.testing.assert_array_equal(fit["lrs"], rank0["lrs"])
    np.testing.assert_array_equal(fit["losses"], rank0["losses"])
    assert torch.equal(fit["rng"], rank0["rng"])
    assert [row["epoch"] for row in fit["values"]] == [0.0, 1.0]


@PRECISIONS
def test_the_next_fit_starts_from_what_came_back(runs: Runs, precision: str) -> None:
    parent, folder = _script(runs, precision)
    start = _load(folder / "rank0-fit1-start.pt")
    fit = parent["fit0"]
    assert_same_state(start["model"], fit["model"])
    # The new schedule has put its first LRs in place; the state (moments, step) is the one kept.
    assert_same_state(start["opt"]["state"], fit["opt"]["state"])
    end = _load(folder / "rank0-fit1-end.pt")
    assert all(s["step"] == 6 + 3 for s in end["opt"]["state"].values())
    assert_same_state(parent["fit1"]["opt"], end["opt"])


@PRECISIONS
def test_the_recorded_lrs_are_the_planned_schedule_of_each_process(
    runs: Runs, precision: str
) -> None:
    parent, _ = _script(runs, precision)
    steps = fork_script.EPOCHS[0] * fork_script.STEPS_PER_EPOCH
    assert parent["fit0"]["lrs"].shape == (steps, 3)
    np.testing.assert_allclose(parent["fit0"]["lrs"], parent["preview"], rtol=1e-12)
    assert parent["fit0"]["trainable"] == [[True, True, True]]


@PRECISIONS
def test_the_timeline_moves_on_by_the_workers_steps_in_one_log_folder(
    runs: Runs, precision: str
) -> None:
    parent, _ = _script(runs, precision)
    steps = [e * fork_script.STEPS_PER_EPOCH for e in fork_script.EPOCHS]
    assert parent["fit0"]["offsets"] == [steps[0], fork_script.EPOCHS[0]]
    assert parent["fit1"]["offsets"] == [sum(steps), sum(fork_script.EPOCHS)]
    assert (parent["fit0"]["epoch"], parent["fit0"]["step"]) == (fork_script.EPOCHS[0], steps[0])
    assert parent["log_dirs"] == ["version_0"]


@PRECISIONS
def test_lr_find_restores_exactly_and_suggests_from_rank_zeros_curve(
    runs: Runs, precision: str
) -> None:
    parent, _ = _script(runs, precision)
    found = parent["lr_find"]
    assert_same_state(found["before"]["model"], found["after"]["model"])
    assert_same_state(found["before"]["opt"], found["after"]["opt"])
    assert torch.equal(found["before"]["rng"], found["after"]["rng"])
    assert found["n_steps"] == fork_script.LR_FIND_ITERATIONS
    assert found["suggested"] == found["expected"]


@PRECISIONS
def test_validate_and_get_preds_cover_the_whole_dataset(runs: Runs, precision: str) -> None:
    parent, _ = _script(runs, precision)
    assert parent["validate"]["valid_loss"] == pytest.approx(parent["expected_valid_loss"], 1e-2)
    assert parent["preds"].shape == parent["expected_probs"].shape == (96, 3)
    # In dataset order. Under bf16-mixed the outputs come in bfloat16, as in one process.
    atol = 1e-6 if precision == "32-true" else 2e-2
    preds = parent["preds"].float()
    torch.testing.assert_close(preds, parent["expected_probs"], atol=atol, rtol=0)


@PRECISIONS
def test_a_workers_nan_guard_error_comes_back_as_itself_and_the_learner_is_unchanged(
    runs: Runs, precision: str
) -> None:
    parent, _ = _script(runs, precision)
    message = parent["nan_error"]
    assert message.startswith("the training loss is nan at optimizer step 1")
    assert "worker process" in message and "as it was before this call" in message
    assert_same_state(parent["nan_before"]["model"], parent["nan_after"]["model"])
    assert_same_state(parent["nan_before"]["opt"], parent["nan_after"]["opt"])
    assert len(parent["nan_after"]["lrs"]) == 0


@PRECISIONS
def test_a_fit_whose_worker_crashed_resumes_from_its_checkpoint_to_the_same_end(
    runs: Runs, precision: str
) -> None:
    parent, _ = _script(runs, precision)
    resume = parent["resume"]
    assert resume["crash"].startswith("simulated crash")
    full, resumed = resume["full"], resume["resumed"]
    assert_same_state(full["model"], resumed["model"])
    assert_same_state(full["opt"], resumed["opt"])
    np.testing.assert_array_equal(full["lrs"], resumed["lrs"])
    np.testing.assert_array_equal(full["losses"], resumed["losses"])
    assert [r["epoch"] for r in resumed["values"]] == [0.0, 1.0, 2.0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_stops_the_workers_and_leaves_the_learner_as_before_the_call(runs: Runs) -> None:
    parent, _ = _script(runs, "32-true")
    stopped = parent["interrupt"]
    assert "worker processes were stopped and nothing came back" in stopped["message"]
    assert_same_state(stopped["before"]["model"], stopped["after"]["model"])
    assert_same_state(stopped["before"]["opt"], stopped["after"]["opt"])
    assert len(stopped["after"]["lrs"]) == 0
    assert stopped["workers"] == ["gone", "gone"]  # ended and reaped


@PRECISIONS
def test_fine_tune_records_both_phases_in_one_table(runs: Runs, precision: str) -> None:
    parent, _ = _script(runs, precision)
    recorded = parent["fine_tune"]
    assert recorded["boundaries"] == [0, fork_script.STEPS_PER_EPOCH]
    assert [row["epoch"] for row in recorded["values"]] == [0.0, 1.0]
    # The table's header once, although the two stages ran in two sets of workers.
    printed = runs.script.stdout.split(f"--- fine_tune {precision} ---")[1]
    printed = printed.split(f"--- fine_tune {precision} done ---")[0]
    assert printed.count("train_loss  valid_loss") == 1
    assert re.findall(r"^\s+([01])\s+\d", printed, re.MULTILINE) == ["0", "1"]


def test_the_notebooks_process_never_initialises_cuda(runs: Runs) -> None:
    for precision in fork_script.PRECISIONS:
        parent, _ = _script(runs, precision)
        assert parent["cuda_inits"] == []


# ----------------------------------------------------------------------------- a Jupyter kernel
def test_in_a_kernel_the_learner_gets_rank_zeros_state_and_goes_on_from_it(runs: Runs) -> None:
    out = _notebook(runs)
    fit0, rank0 = _load(out / "nb-fit0.pt"), _load(out / "rank0-fit0-end.pt")
    assert rank0["world_size"] == 2
    assert_same_state(fit0["opt"], rank0["opt"])
    assert_same_state(fit0["model"], rank0["model"])
    np.testing.assert_array_equal(fit0["lrs"], rank0["lrs"])
    start = _load(out / "rank0-fit1-start.pt")
    assert_same_state(start["opt"]["state"], fit0["opt"]["state"])
    assert_same_state(start["model"], fit0["model"])
    assert_same_state(_load(out / "nb-fit1.pt")["opt"], _load(out / "rank0-fit1-end.pt")["opt"])


def test_in_a_kernel_lr_find_restores_exactly_and_evaluation_sees_every_item(runs: Runs) -> None:
    out = _notebook(runs)
    found = _load(out / "nb-lr_find.pt")
    assert_same_state(found["before"]["model"], found["after"]["model"])
    assert_same_state(found["before"]["opt"], found["after"]["opt"])
    assert found["n_steps"] == 12 and found["suggested"] > 0
    evaluated = _load(out / "nb-eval.pt")
    preds, targets = evaluated["preds"]
    assert preds.shape == (96, 3) and targets.shape == (96,)
    assert np.isfinite(evaluated["validate"]["valid_loss"])


def test_in_a_kernel_the_cell_shows_rank_zeros_progress(runs: Runs) -> None:
    _notebook(runs)
    outputs = runs.notebook.cells[2].outputs  # the first fit
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    # As plain text: ipykernel drops a forked process's rich displays but forwards its prints.
    assert text.count("train_loss  valid_loss") == 1
    # The live line of each epoch (tqdm's text, redrawn with carriage returns), then its row.
    assert re.search(r"\repoch 0: .*\d/3 \[", text) and re.search(r"\repoch 1: .*\d/3 \[", text)
    first_row = re.search(r"^\s*0\s+\d+\.\d+", text, re.M)  # epoch 0's row of the table
    assert first_row is not None and text.index("epoch 1:") > first_row.start()


# ----------------------------------------------------------------------------- in this process
def test_ddp_spawn_is_refused_with_the_reason_before_anything_changes(tmp_path) -> None:
    learn = make_learner(tmp_path, strategy="ddp_spawn", accelerator="cpu", devices=2)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"unpickle the whole Learner.*ddp_notebook"):
        learn.fit_one_cycle(1)
    with pytest.raises(ValueError, match="'spawn'"):
        learn.lr_find(num_it=5, show_plot=False)
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("strategy", ["ddp_notebook", "ddp_fork"])
def test_a_fork_after_cuda_was_initialised_is_refused_naming_the_rule(
    tmp_path, monkeypatch, strategy: str
) -> None:
    learn = make_learner(tmp_path, strategy=strategy, accelerator="cpu", devices=2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match=r"CUDA is already initialised.*Restart the kernel"):
        learn.fit_one_cycle(1)
    with pytest.raises(ValueError, match="CUDA is already initialised"):
        learn.get_preds()


def test_lightnings_launcher_internals_that_the_handback_relies_on(tmp_path) -> None:
    """`difflr.training.handback` replaces ``strategy._launcher`` and reads ``_start_method``."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    from difflr.training.handback import _HandbackLauncher

    learn = make_learner(tmp_path, strategy="ddp_notebook", accelerator="cpu", devices=2)
    trainer = learn.runner.trainer([], standard=False)
    launcher = trainer.strategy.launcher
    assert isinstance(launcher, _HandbackLauncher)
    assert launcher is trainer.strategy._launcher
    assert launcher._start_method == "fork"
    for hook in ("get_extra_results", "update_main_process_results"):
        assert hook in vars(_MultiProcessingLauncher)
    # A Trainer that runs here keeps Lightning's launcher (none, for one device).
    plain = make_learner(tmp_path).runner.trainer([], standard=False)
    assert not isinstance(plain.strategy.launcher, _HandbackLauncher)


def test_a_handback_puts_back_what_was_collected_whatever_changed_since(tmp_path) -> None:
    """`Handback.collect` then `apply` in one process, the changes a call makes undone."""
    import random

    from lightning.pytorch.callbacks import EarlyStopping

    from difflr.training.handback import Handback

    learn = make_learner(tmp_path)
    stop = EarlyStopping("valid_loss")
    stop.wait_count = 3
    trainer = learn.runner.trainer([stop], standard=False)
    learn.model(torch.randn(4, 6)).sum().backward()
    learn.opt.step()
    learn.recorder._lrs.append(np.array([1e-3, 2e-3, 3e-3]))
    learn.model.register_buffer("scratch", torch.arange(3.0), persistent=False)
    learn.model[0].weight.requires_grad_(False)
    learn.model.eval()
    handback = Handback(learn.module, learn.opt, trainer.callbacks)
    kept = {
        "opt": copy.deepcopy(learn.opt.state_dict()),
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }
    data = handback.collect(trainer)

    # What a call in this process would have changed.
    learn.opt.state.clear()
    learn.recorder.reset()
    stop.wait_count = 0
    learn.model.scratch.zero_()
    learn.model[0].weight.requires_grad_(True)
    learn.model.train()
    torch.rand(5), np.random.rand(5), random.random()
    trainer.callbacks.insert(0, EarlyStopping("valid_loss"))  # configure_callbacks in a worker

    handback.apply(trainer, data)
    assert_same_state(learn.opt.state_dict(), kept["opt"])
    np.testing.assert_array_equal(learn.recorder.lrs, [[1e-3, 2e-3, 3e-3]])
    assert stop.wait_count == 3
    assert torch.equal(learn.model.scratch, torch.arange(3.0))
    assert not learn.model[0].weight.requires_grad and learn.model[3].weight.requires_grad
    assert not learn.model.training and not learn.model[1].training
    assert torch.equal(torch.get_rng_state(), kept["rng"][0])
    np.testing.assert_array_equal(np.random.get_state()[1], kept["rng"][1])
    assert random.getstate() == kept["rng"][2]
