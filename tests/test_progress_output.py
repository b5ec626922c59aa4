"""What a user sees while training: a script's output in a terminal (a pseudo-terminal, so the
script runs as it would in one), and the display a fit leaves in a real Jupyter kernel.

The fits themselves are tiny: most of the time is the two fresh Python processes importing torch
and Lightning, so the script and the kernel run at the same time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_progress import parse, screen

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240

#: Three tables: fit_one_cycle (epoch 0), fine_tune (epochs 0 and 1, two Trainers), and one without
#: a live line; between them an lr_find, whose line stays on screen (it has no table).
SCRIPT = """
import sys, time
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from difflr import Learner
from tests.helpers import make_loaders, make_model, three_groups

class Slow(Callback):  # 60 batches of 5 ms: the line refreshes inside each epoch
    def on_train_batch_end(self, *args):
        time.sleep(0.005)

def learner(**kwargs):
    return Learner(make_model(), make_loaders(240, 4), loss_func=F.cross_entropy,
                   splitter=three_groups, path=sys.argv[1], logger=False, checkpoint=False,
                   callbacks=[Slow()], **kwargs)

learn = learner()
learn.fit_one_cycle(1, 1e-2)
learn.fine_tune(1)
learn.lr_find(num_it=30, show_plot=False)
print("--- no progress bar ---")
learner(enable_progress_bar=False).fit_one_cycle(1, 1e-2)
"""

HEADER = re.compile(r"^\s*epoch\s+train_loss\s+valid_loss\s+time$")
ROW = re.compile(r"^\s*\d+(\s+(-?\d+\.\d+(e[-+]\d+)?|—))+\s+\d+:\d\d(:\d\d)?$")
BAR = re.compile(r"^(epoch \d+|lr_find)(:| validation:)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


class _Terminal:
    """``SCRIPT`` running with its stdout on a 120-column pseudo-terminal, read by a thread."""

    def __init__(self, tmp_path: Path) -> None:
        import fcntl
        import pty
        import struct
        import termios

        self.stderr = tmp_path / "stderr.txt"
        main, child = pty.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        with open(self.stderr, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SCRIPT, str(tmp_path)],
                stdout=child,
                stderr=stderr,
                cwd=tmp_path,
                env=_env(),
            )
        os.close(child)
        self.main, self.chunks = main, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.main, 65536)
            except OSError:  # EIO: the script has exited and closed the terminal
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    def output(self) -> str:
        """What the script wrote, once it has ended (killed after ``TIMEOUT`` seconds)."""
        try:
            self.process.wait(timeout=TIMEOUT)
        finally:
            self.process.kill()
            self.reader.join(timeout=10)
            os.close(self.main)
        assert self.process.returncode == 0, self.stderr.read_text()[-4000:]
        return b"".join(self.chunks).decode("utf-8")


KERNEL_SETUP = """
import torch.nn.functional as F
from difflr import Learner
from tests.helpers import make_loaders, make_model, three_groups
learn = Learner(make_model(), make_loaders(400, 8), loss_func=F.cross_entropy,
                splitter=three_groups, logger=False, checkpoint=False)

import time
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

def slow_collate(items):  # 40 batches of 50 ms: the line refreshes during the pass
    time.sleep(0.05)
    return default_collate(items)

slow_valid = DataLoader(make_loaders(160, 4)[0].dataset, batch_size=4, collate_fn=slow_collate)
"""

#: The cells after the setup: a fit, a validation pass and an lr_find, each in its own cell.
KERNEL_CELLS = (
    "learn.fit(1)",
    "learn.validate(slow_valid)",
    "learn.lr_find(num_it=30, stop_div=False, show_plot=False)",
)


def _run_in_a_kernel(tmp_path: Path) -> Any:
    """A notebook that fits one epoch of 50 batches, validates and runs an lr_find
    (`KERNEL_CELLS`), run in a fresh kernel."""
    import nbclient
    import nbformat

    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(code) for code in (KERNEL_SETUP, *KERNEL_CELLS)]
    )
    env = _env()
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PYTHONPATH", "OMP_NUM_THREADS"):
            patch.setenv(key, env[key])
        nbclient.NotebookClient(
            notebook,
            kernel_name="python3",
            timeout=TIMEOUT,
            resources={"metadata": {"path": str(tmp_path)}},
        ).execute()
    return notebook


@dataclass
class Seen:
    terminal: str | BaseException | None  # what the script wrote; None without a pseudo-terminal
    notebook: Any  # the executed notebook (or its error); None without nbclient and ipykernel


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> Seen:
    """The script and the kernel, run at the same time: each is mostly a fresh Python process
    importing torch and Lightning. A failure of one is raised by its own test only."""
    has_pty = importlib.util.find_spec("pty") is not None and sys.platform != "win32"
    has_kernel = all(importlib.util.find_spec(m) for m in ("nbclient", "nbformat", "ipykernel"))
    terminal = _Terminal(tmp_path_factory.mktemp("terminal")) if has_pty else None
    notebook: Any = None
    if has_kernel:
        try:
            notebook = _run_in_a_kernel(tmp_path_factory.mktemp("kernel"))
        except Exception as error:  # CellExecutionError names the cell
            notebook = error
    raw: str | BaseException | None = None
    if terminal is not None:
        try:
            raw = terminal.output()
        except Exception as error:
            raw = error
    return Seen(raw, notebook)


def _result(value: Any, skip: str) -> Any:
    if value is None:
        pytest.skip(skip)
    if isinstance(value, BaseException):
        raise value
    return value


def test_in_a_terminal_the_table_rows_and_the_bar_never_share_a_line(seen):
    raw = _result(seen.terminal, "needs a POSIX pseudo-terminal")
    lines = screen(raw)

    # On screen at the end: the three tables, each row on a line of its own, lr_find's last line
    # between them; no bar of a training epoch is left.
    kinds = [
        "header" if HEADER.match(line) else "row" if ROW.match(line) else line.split(":")[0]
        for line in lines
    ]
    assert kinds == [
        "header",
        "row",
        "header",
        "row",
        "row",
        "lr_find",
        "--- no progress bar ---",
        "header",
        "row",
    ], "\n".join(lines)
    assert [line.split()[0] for line in lines if ROW.match(line)] == ["0", "0", "1", "0"]

    # Everything written between two carriage returns or newlines is a bar or a row, never both.
    pieces = [piece.strip() for piece in re.split(r"[\r\n]", raw) if piece.strip()]
    bars = [piece for piece in pieces if BAR.match(piece)]
    final = {line.strip() for line in lines}
    for piece in pieces:
        assert not (BAR.match(piece) and re.search(r"\d\.\d{6}", piece)), piece
        assert BAR.match(piece) or piece in final, f"{piece!r} is neither a bar nor a final line"

    # The bar showed the epoch running (not only its start and end), numbered as the table
    # numbers its epochs (fine_tune's second Trainer says epoch 1), and never Lightning's bar.
    running = [parse(bar) for bar in bars if re.match(r"epoch \d+:", bar)]
    assert any(0 < done < total for _, done, total in running), bars
    labels = [label for label, _, _ in running]
    changes = [label for i, label in enumerate(labels) if i == 0 or label != labels[i - 1]]
    assert changes == ["epoch 0", "epoch 1"], changes
    assert "Epoch" not in raw  # Lightning's own bar
    # enable_progress_bar=False: the table alone.
    assert not [p for p in pieces[pieces.index("--- no progress bar ---") :] if BAR.match(p)]


def test_in_a_jupyter_kernel_a_fit_leaves_one_display_that_shows_every_batch(seen):
    notebook = _result(seen.notebook, "nbclient, nbformat and ipykernel run it ([dev] extra)")
    outputs = notebook.cells[1].outputs
    displays = [o for o in outputs if o.output_type == "display_data"]
    assert len(displays) == 1, json.dumps(outputs, indent=1)[:4000]  # one display per fit call
    text, html = displays[0]["data"]["text/plain"], displays[0]["data"]["text/html"]
    header, row, line = text.splitlines()
    assert HEADER.match(header) and ROW.match(row) and row.split()[0] == "0"
    assert parse(line) == ("epoch 0", 50, 50)
    assert 'value="50" max="50"' in html and 'data-state="finished"' in html
    assert "<td>0</td>" in html
    # No text bar (Lightning's, or a bar printed line by line) in the cell's streams.
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "\r" not in streams and "it/s" not in streams


@pytest.mark.parametrize(("cell", "label", "steps"), [(2, "validation", 40), (3, "lr_find", 30)])
def test_in_a_jupyter_kernel_validate_and_lr_find_leave_their_whole_run(seen, cell, label, steps):
    # issue 27: the last frame of a bar ("validation: 75%") stayed in the docs' output. Each call
    # leaves one difflr display, finished, counting every step; no text bar in the streams.
    notebook = _result(seen.notebook, "nbclient, nbformat and ipykernel run it ([dev] extra)")
    outputs = notebook.cells[cell].outputs
    displays = [o for o in outputs if o.output_type == "display_data"]
    assert len(displays) == 1, json.dumps(outputs, indent=1)[:4000]
    text, html = displays[0]["data"]["text/plain"], displays[0]["data"]["text/html"]
    assert parse(text.splitlines()[-1]) == (label, steps, steps)
    assert f'value="{steps}" max="{steps}"' in html and 'data-state="finished"' in html
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "\r" not in streams and "it/s" not in streams and "%" not in streams


def test_importing_difflr_in_a_kernel_shows_no_tqdm_widget_warning(seen: Seen) -> None:
    # Lightning -> torchmetrics -> transformers -> tqdm.auto warns "IProgress not found" at import
    # in a kernel without ipywidgets; the first cell imports difflr and shows nothing.
    notebook = _result(seen.notebook, "needs nbclient and ipykernel")
    text = "".join(output.get("text", "") for output in notebook.cells[0].outputs)
    assert "IProgress" not in text and "TqdmWarning" not in text, text
