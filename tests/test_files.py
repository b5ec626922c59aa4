"""Files and trust: atomic writes survive kills and full disks, reads never run a file's code,
save/load stay inside path/models and load all or nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflr.utils.files import UnreadableFileError, atomic_save, one_builder, safe_load, state_file
from tests.helpers import make_learner, make_loaders, run_script

ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling it runs a command: what a crafted checkpoint from a stranger holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(file: Path, marker: Path, payload_key: str = "model") -> Path:
    torch.save({payload_key: RunsCode(marker), "state_dict": {}}, file)
    return file


# ------------------------------------------------------------------------------------------------
# Nothing from a file runs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        lambda learn, file: learn.load(file),
        lambda learn, file: learn.load(file.stem),
        lambda learn, file: learn.fit(1, ckpt_path=file),
        lambda learn, file: learn.fit_one_cycle(1, ckpt_path="last"),
    ],
    ids=["load(path)", "load(name)", "ckpt_path=file", "ckpt_path=last"],
)
def test_a_crafted_pickle_runs_nothing_at_any_entry_point(tmp_path, entry):
    marker = tmp_path / "pwned"
    (tmp_path / "models").mkdir()
    (tmp_path / "checkpoints").mkdir()
    file = crafted(tmp_path / "models" / "evil.pth", marker)
    crafted(tmp_path / "checkpoints" / "last.ckpt", marker, payload_key="difflr")
    learn = make_learner(tmp_path)
    before = [p.detach().clone() for p in learn.model.parameters()]
    target = tmp_path / "checkpoints" / "last.ckpt" if "ckpt" in str(entry) else file
    with pytest.raises(UnreadableFileError, match="would run code or build Python objects"):
        entry(learn, target if target.suffix == ".ckpt" else file)
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_a_crafted_lr_find_snapshot_runs_nothing(tmp_path):
    from difflr.training.lr_finder import _Snapshot

    learn = make_learner(tmp_path)
    marker = tmp_path / "pwned"
    snapshot = _Snapshot(learn.module, learn.opt, tmp_path)
    # The file has no name; only something holding its descriptor could write into it.
    snapshot.handle.seek(0)
    snapshot.handle.truncate()
    torch.save({"values": RunsCode(marker)}, snapshot.handle)
    with pytest.raises(UnreadableFileError, match="holds the sweep's last weights"):
        snapshot.restore(learn.module, learn.opt)
    assert not marker.exists()


def test_two_disk_snapshots_in_one_folder_do_not_share_a_file(tmp_path):
    from difflr.training.lr_finder import _Snapshot

    a, b = make_learner(tmp_path / "a"), make_learner(tmp_path / "b")
    first = _Snapshot(a.module, a.opt, tmp_path)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(1.0)
    second = _Snapshot(b.module, b.opt, tmp_path)
    assert first.handle.fileno() != second.handle.fileno()
    expected = [p.detach().clone() for p in a.model.parameters()]
    with torch.no_grad():
        for p in a.model.parameters():
            p.zero_()
    first.restore(a.module, a.opt)
    assert all(torch.equal(x, y) for x, y in zip(expected, a.model.parameters()))
    second.restore(b.module, b.opt)
    assert [p for p in tmp_path.iterdir() if p.is_file()] == []  # no snapshot file left


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------


def test_names_stay_inside_path_models(tmp_path):
    learn = make_learner(tmp_path)
    for name in ("../../x", "/etc/x", "a/b", "..", ""):
        with pytest.raises(ValueError, match="not a plain file name"):
            learn.save(name)
    assert not (tmp_path.parent / "x.pth").exists()
    with pytest.raises(TypeError, match="must be a str"):
        learn.save(3)


def test_a_name_with_a_dot_round_trips(tmp_path):
    learn = make_learner(tmp_path)
    assert learn.save("stage1.5") == tmp_path / "models" / "stage1.5.pth"
    learn.load("stage1.5")
    assert state_file(tmp_path / "models", "final.pth") == tmp_path / "models" / "final.pth"


def test_a_save_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pth").symlink_to(outside)
    make_learner(tmp_path).save("model")
    assert outside.read_text() == "precious"
    assert not (tmp_path / "models" / "model.pth").is_symlink()


def test_a_refused_load_changes_nothing(tmp_path):
    saver = make_learner(tmp_path)
    saver.save("three_groups")
    other = make_learner(tmp_path, splitter=lambda m: [m[:5], m[5]])
    with torch.no_grad():
        for p in other.model.parameters():
            p.fill_(0.5)
    other.fit(1)  # optimizer state to keep
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    opt_before = str(other.opt.state_dict()["param_groups"])
    with pytest.raises(ValueError, match="the layer groups differ"):
        other.load("three_groups")
    after = other.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert str(other.opt.state_dict()["param_groups"]) == opt_before


def test_groups_in_another_order_are_refused(tmp_path):
    def twin() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    saver = make_learner(
        tmp_path, twin(), make_loaders(), F.mse_loss, splitter=lambda m: [m[0], m[1]]
    )
    saver.save("s")
    swapped = make_learner(
        tmp_path, twin(), make_loaders(), F.mse_loss, splitter=lambda m: [m[1], m[0]]
    )
    with pytest.raises(ValueError, match="the layer groups differ"):
        swapped.load("s")
    swapped.load("s", with_opt=False)  # the weights alone are fine


def test_a_file_that_is_not_a_learner_state_is_named(tmp_path):
    torch.save(3, tmp_path / "three.pth")
    with pytest.raises(UnreadableFileError, match="not a Learner state"):
        make_learner(tmp_path).load(tmp_path / "three.pth")


# ------------------------------------------------------------------------------------------------
# Kills and full disks
# ------------------------------------------------------------------------------------------------


def test_an_interrupted_write_leaves_the_previous_file_and_no_temp(tmp_path):
    file = atomic_save({"v": torch.ones(3)}, tmp_path / "a.pt")

    class Boom(Exception):
        pass

    def explode(handle):
        handle.write(b"half")
        raise Boom

    from difflr.utils.files import atomic_write

    with pytest.raises(Boom):
        atomic_write(file, explode)
    assert torch.equal(safe_load(file)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from difflr.utils.files import atomic_save
    target = Path(sys.argv[1])
    for i in range(1000):
        print(i, flush=True)
        atomic_save({"i": i, "w": torch.full((4_000_000,), float(i))}, target)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_kill_during_a_write_on_another_filesystem_leaves_a_loadable_file(tmp_path):
    # /dev/shm is a tmpfs: another filesystem than the temp dir, where a copy-based "atomic"
    # save leaves a truncated file when killed.
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    folder = Path(tempfile_dir(base))
    target = folder / "last.ckpt"
    atomic_save({"i": -1, "w": torch.full((4_000_000,), -1.0)}, target)
    try:
        for delay in (0.05, 0.13, 0.31):
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(target)],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            writer.stdout.readline()  # the first write has started
            time.sleep(delay)
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            loaded = safe_load(target, "checkpoint")
            assert torch.all(loaded["w"] == float(loaded["i"]))
    finally:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()


def tempfile_dir(base: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="difflr-test-", dir=base)


FULL_DISK = """
    import resource, signal, sys
    import torch, torch.nn.functional as F
    from torch import nn
    from difflr import Learner
    from tests.helpers import make_loaders
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4096), nn.Linear(4096, 3))  # about 150 kB
    learn = Learner(model, make_loaders(), F.cross_entropy, path=sys.argv[1], logger=False)
    learn.save("model")
    # A full disk: writes past 64 kB fail (EFBIG) instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
    with torch.no_grad():
        model[0].weight.fill_(7.0)
    try:
        learn.save("model")
    except OSError as error:
        print("refused:", error)
    """


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_keeps_the_previous_save_and_says_so(tmp_path):
    result = run_script(FULL_DISK, str(tmp_path))
    assert "refused: " in result.stdout, result.stdout + result.stderr
    assert "the previous model.pth is unchanged" in result.stdout
    state = safe_load(tmp_path / "models" / "model.pth")
    assert not torch.any(state["model"]["0.weight"] == 7.0)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["model.pth"]


def test_one_builder_makes_a_second_builder_wait_and_says_so(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "model.pt"
    events: list[str] = []

    def second() -> None:
        with one_builder(target, on_wait=lambda: events.append("waiting")):
            events.append("second builds")

    with one_builder(target):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=0.3)
        assert thread.is_alive() and events == ["waiting"]  # blocked while the first holds it
        events.append("first done")
    thread.join(timeout=5)
    assert events == ["waiting", "first done", "second builds"]
    with one_builder(target, on_wait=lambda: events.append("waited again")):
        pass  # free: no waiting
    assert events[-1] == "second builds"


# ------------------------------------------------------------------------------------------------
# Issue 25: faults while writing and reading
# ------------------------------------------------------------------------------------------------

CTRL_C_WHILE_WRITING = """
    import os, signal, sys, threading, time
    from pathlib import Path
    import torch
    from difflr.utils.files import atomic_save

    content = {"w": [torch.randn(1_000_000) for _ in range(40)]}  # 160 MB: most time is writing

    def press_ctrl_c():
        while True:
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    while True:
        atomic_save(content, Path(sys.argv[1]) / "big.pt")
    """


def test_ctrl_c_during_a_write_is_a_keyboard_interrupt_and_leaves_no_temp_file(tmp_path):
    # torch.save's C++ writer turns the KeyboardInterrupt into "RuntimeError: [enforce fail at
    # inline_container.cc] unexpected pos" (3 runs of 3 before the fix).
    result = run_script(CTRL_C_WHILE_WRITING, tmp_path)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("KeyboardInterrupt"), result.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] in ([], ["big.pt"])


def test_checksum_covers_tensors_values_and_nesting():
    from difflr.utils.files import checksum

    base = {"a": torch.arange(6.0).reshape(2, 3), "b": [1, 2.5, "x", None], "c": {"d": True}}
    same = {"a": torch.arange(6.0).reshape(2, 3), "b": [1, 2.5, "x", None], "c": {"d": True}}
    assert checksum(base) == checksum(same)
    changed = [
        {**base, "a": torch.arange(6.0).reshape(3, 2)},  # shape
        {**base, "a": torch.arange(6).reshape(2, 3)},  # dtype
        {**base, "a": torch.arange(6.0).reshape(2, 3) + 1e-7},  # one value
        {**base, "b": [1, 2.5, "y", None]},
        {**base, "c": {"d": 1}},  # bool -> int
        {"b": base["b"], "a": base["a"], "c": base["c"]},  # order
    ]
    assert len({checksum(c) for c in changed} | {checksum(base)}) == len(changed) + 1
    # A view saves its whole storage; the loaded view still has the same checksum.
    big = torch.arange(100.0)
    assert checksum({"v": big[10:20]}) == checksum({"v": torch.arange(10.0, 20.0)})


def test_every_dict_difflr_writes_carries_a_checksum_that_safe_load_verifies(tmp_path):
    file = atomic_save({"w": torch.ones(3), "n": 3}, tmp_path / "x.pt")
    raw = torch.load(file, weights_only=True)
    assert "difflr.checksum" in raw
    loaded = safe_load(file)
    assert set(loaded) == {"w", "n"}  # the checksum is removed on read
    raw["n"] = 4  # edited, checksum kept
    torch.save(raw, file)
    with pytest.raises(UnreadableFileError, match=r"x\.pt is corrupt"):
        safe_load(file)


def test_a_symlink_at_a_lock_file_is_refused_not_followed(tmp_path):
    target = tmp_path / "model.pt"
    elsewhere = tmp_path / "created"
    (tmp_path / "model.pt.lock").symlink_to(elsewhere)  # dangling
    with pytest.raises(OSError, match=r"model\.pt\.lock .*symlink"), one_builder(target):
        pass
    assert not elsewhere.exists()


KILLED_MID_WRITE = """
    import sys, time
    from pathlib import Path
    from difflr.utils.files import atomic_write

    def write(handle):
        handle.write(b"partial" * 1000)
        handle.flush()
        print("writing", flush=True)
        time.sleep(120)

    atomic_write(Path(sys.argv[1]) / "models" / "state.pth", write)
    """


def test_temp_files_of_a_killed_write_are_removed_by_a_later_save(tmp_path):
    from difflr.utils.files import TEMP_PREFIX

    def writer():
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(KILLED_MID_WRITE), str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert child.stdout.readline().strip() == "writing"
        return child

    def temps():
        return sorted((tmp_path / "models").glob(f"{TEMP_PREFIX}*"))

    def age(files):
        for file in files:
            os.utime(file, (time.time() - 60, time.time() - 60))

    killed = writer()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live = writer()  # a write in progress in another process is left alone
    try:
        left = temps()
        assert len(left) == 2
        age(left)
        make_learner(tmp_path).save("state")
        assert len(temps()) == 1  # the killed one's is gone, the live one's is there
    finally:
        live.kill()
        live.wait()


LIMITED = """
    import resource, signal, sys
    from pathlib import Path
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import torch, torch.nn.functional as F
    from torch import nn
    from tests.helpers import make_learner, make_loaders
    limit = int(sys.argv[3])
    if sys.argv[2] == "lr_find":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4096), nn.Linear(4096, 3))  # about 150 kB
        learn = make_learner(sys.argv[1], model=model, splitter=lambda m: [m[0], m[1]])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            learn.lr_find(num_it=5, snapshot="disk", show_plot=False)
        except OSError as error:
            print("refused:", error)
        same = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        print("unchanged" if same else "CHANGED")
    else:
        from difflr.training.checkpoints import FolderClaim
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            with FolderClaim(Path(sys.argv[1]) / "checkpoints", "me"):
                pass
        except OSError as error:
            print("refused:", error)
    """


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_stops_lr_find_before_the_sweep_naming_the_folder(tmp_path):
    # A full disk is simulated with RLIMIT_FSIZE (EFBIG), as in the test of save above.
    result = run_script(LIMITED, tmp_path, "lr_find", 64_000)
    assert "refused: " in result.stdout, result.stdout + result.stderr
    assert f"could not write its snapshot in {tmp_path}" in result.stdout
    assert "unchanged" in result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing left behind


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_at_the_claim_names_the_claim_file(tmp_path):
    result = run_script(LIMITED, tmp_path, "claim", 10)
    assert "refused: " in result.stdout, result.stdout + result.stderr
    assert str(tmp_path / "checkpoints" / ".claim") in result.stdout


def test_learn_load_of_odd_plain_files_is_refused_before_anything_changes(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1)
    good = torch.load(learn.save("good"), weights_only=True)
    good.pop("difflr.checksum")
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt_before = repr(learn.opt.state_dict()["param_groups"])

    def edited(**changes):
        state = {**good, **changes}
        torch.save(state, tmp_path / "models" / "odd.pth")
        return "odd"

    first_lr = {**good["opt"]["param_groups"][0], "lr": "fast"}
    cases = [
        ({"frozen": ["yes", "no", 0]}, r"frozen pattern is \['yes', 'no', 0\]"),
        (
            {"opt": {**good["opt"], "param_groups": [first_lr, *good["opt"]["param_groups"][1:]]}},
            r"param_groups\[0\]\['lr'\] is 'fast'",
        ),
        ({"opt": {**good["opt"], "state": {99: {}}}}, r"state entry 99"),
        ({"opt": {"state": {}}}, r"optimizer state is malformed"),
        ({"model": {**good["model"], "0.weight": [1.0]}}, r"\['0\.weight'\] are not tensors"),
    ]
    for changes, words in cases:
        edited(**changes)
        with pytest.raises(ValueError, match=words):
            learn.load("odd")
        assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())
        assert repr(learn.opt.state_dict()["param_groups"]) == opt_before
    assert "lr" in learn.summary()  # still works


@pytest.mark.parametrize("fname", ["../x.pt", "sub/x.pt", "/tmp/elsewhere.pt", ".."])
def test_export_stays_under_path_like_save(tmp_path, fname):
    learn = make_learner(tmp_path / "learner")
    with pytest.raises(ValueError, match="not a plain file name"):
        learn.export(fname)
    assert not (tmp_path / "x.pt").exists()
    assert learn.export(tmp_path / "x.pt") == tmp_path / "x.pt"  # a Path goes where it says


LOGS_ON_A_FULL_DISK = """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from tests.helpers import make_learner
    learn = make_learner(sys.argv[1], logger=True, checkpoint=False)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10, 10))
    try:
        learn.fit(1)
    except OSError as error:
        print("refused:", error)
    """


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_at_the_first_tensorboard_write_names_the_log_folder(tmp_path):
    # (A real full tmpfs fails the same way: the event file's first record, at the writer's
    # creation, was a bare "OSError: [Errno 28] No space left on device".)
    result = run_script(LOGS_ON_A_FULL_DISK, tmp_path)
    assert "refused: " in result.stdout, result.stdout + result.stderr[-3000:]
    assert f"could not write the logs in {tmp_path / 'lightning_logs'}" in result.stdout
