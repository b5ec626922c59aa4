"""The per-epoch table and the live line: one display updated in place in Jupyter (faked here),
text lines and a bar that never share a line in a terminal, rank 0 only, and a refresh rate
bounded by a clock (a fake one: no sleeps).

What a real terminal and a real Jupyter kernel show is tested in ``test_progress_output.py``.
"""

from __future__ import annotations

import math
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from difflr import Learner, Recorder
from difflr.callbacks import progress, step_loss
from difflr.callbacks.progress import (
    LiveProgress,
    ProgressTable,
    _format,
    _Line,
    _Output,
    format_time,
)
from difflr.callbacks.step_loss import SmoothedLoss
from tests.helpers import make_learner

# Tiny's validation_step is unused in the fits without validation data.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step`")

TICK = 1 / 64  # fake seconds per batch: exact in binary, so the refresh instants are exact
REFRESH = 16 * TICK  # 0.25 s: a refresh every 16 batches at most


class FakeHandle:
    def __init__(self, shown: list[dict]) -> None:
        self.shown = shown

    def update(self, obj, raw=False):
        assert raw
        self.shown.append(obj)


class FakeNotebook:
    """``IPython.display.display`` as a kernel would run it: records every display and update."""

    def __init__(self) -> None:
        self.displays: list[list[dict]] = []  # one list of bundles (first + updates) per display

    def display(self, obj, raw=False, display_id=False):
        assert raw and display_id is True
        self.displays.append([obj])
        return FakeHandle(self.displays[-1])

    def texts(self, index: int = -1) -> list[str]:
        return [bundle["text/plain"] for bundle in self.displays[index]]


@pytest.fixture
def notebook(monkeypatch) -> FakeNotebook:
    ipython_display = pytest.importorskip("IPython.display")
    fake = FakeNotebook()
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(ipython_display, "display", fake.display)
    return fake


@pytest.fixture
def terminal(monkeypatch) -> None:
    monkeypatch.setattr(progress, "in_notebook", lambda: False)


class FakeTrainer:
    is_global_zero = True


def _row(epoch: int, **values: float) -> dict[str, float]:
    return {"epoch": float(epoch), **values}


def screen(raw: str) -> list[str]:
    """What a terminal shows for ``raw``: a carriage return moves back to column 0."""
    lines, current, column = [], [], 0
    for char in raw:
        if char == "\n":
            lines.append("".join(current).rstrip())
            current, column = [], 0
        elif char == "\r":
            column = 0
        else:
            current[column : column + 1] = [char]
            column += 1
    lines.append("".join(current).rstrip())
    return [line for line in lines if line]


def parse(line: str) -> tuple[str, int, int | None]:
    """``(label, done, total)`` of a live line's text."""
    match = re.match(r"(.+?): (?:\s*\d+%\|.*?\| )?(\d+)(?:/(\d+)|it)", line)
    assert match, line
    label, done, total = match.groups()
    return label, int(done), None if total is None else int(total)


# ------------------------------------------------------------------------------ the table alone
def test_in_a_notebook_the_table_is_displayed_once_and_updated_in_place(notebook):
    recorder = Recorder(log_hypers=False)
    table = ProgressTable(recorder)
    table.start()
    for epoch in range(3):
        recorder.values.append(
            _row(epoch, train_loss=1.0 / (epoch + 1), valid_loss=math.nan, time=0.5)
        )
        table.on_train_epoch_end(FakeTrainer(), None)
    [bundles] = notebook.displays
    assert len(bundles) == 3  # displayed once, then updated twice
    first, last = bundles[0]["text/html"], bundles[-1]["text/html"]
    assert last.count("<tr>") == 4  # header + 3 epochs
    assert "<th>train_loss</th>" in first and "<td>0.333333</td>" in last
    assert "<td>—</td>" in first  # NaN shows as a dash
    assert "<progress" not in last  # no live line without LiveProgress
    assert bundles[-1]["text/plain"].splitlines()[-1].split() == ["2", "0.333333", "—", "00:00"]

    table.start()  # the next fit call gets a display of its own
    table.on_train_epoch_end(FakeTrainer(), None)
    assert len(notebook.displays) == 2


def test_in_a_terminal_each_epoch_prints_one_line_under_one_header(terminal, capsys):
    recorder = Recorder(log_hypers=False)
    table = ProgressTable(recorder)
    for epoch in range(2):
        recorder.values.append(_row(epoch, train_loss=0.5, time=1.25))
        table.on_train_epoch_end(FakeTrainer(), None)
        table.on_train_epoch_end(FakeTrainer(), None)  # a second call shows nothing new
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["epoch", "train_loss", "time"],
        ["0", "0.500000", "00:01"],
        ["1", "0.500000", "00:01"],
    ]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.0, "00:00"), (19.534229, "00:19"), (61.0, "01:01"), (3599.9, "59:59"), (3725.0, "1:02:05")],
)
def test_the_time_column_reads_as_fastai_prints_it(seconds, shown):
    assert format_time(seconds) == shown
    assert _format(seconds, "time") == shown
    assert _format(seconds, "valid_loss") != shown  # only the time column


def test_other_ranks_show_nothing(terminal, capsys):
    recorder = Recorder(log_hypers=False)
    recorder.values.append(_row(0, train_loss=0.5))
    trainer = FakeTrainer()
    trainer.is_global_zero = False
    ProgressTable(recorder).on_train_epoch_end(trainer, None)
    bar = LiveProgress(ProgressTable(recorder))
    bar.setup(trainer, None, "fit")  # Lightning's ProgressBar disables itself off rank 0
    assert not bar.is_enabled
    bar.on_train_epoch_end(trainer, None)
    bar.on_train_end(trainer, None)
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------ the line
def test_line_text_counts_batches_and_time_and_shows_the_loss():
    line = _Line("epoch 3", 23, 50, 12.0, loss=0.53214)
    assert line.text().startswith("epoch 3:  46%|")
    assert "23/50 [00:12<00:14" in line.text() and line.text().endswith("train_loss=0.5321]")
    assert 'value="23" max="50"' in line.html() and "00:12&lt;00:14" in line.html()


def test_a_loader_without_length_shows_a_count_without_total():
    line = _Line("epoch 0", 23, None, 12.0)
    assert "epoch 0: 23it [00:12" in line.text() and not re.search(r"\d/\d", line.text())
    assert "<progress style" in line.html()  # indeterminate: no value, no max


def test_an_interrupted_line_says_so():
    assert _Line("epoch 1", 7, 50, 2.0, state="interrupted").text().endswith("interrupted]")


def test_in_a_terminal_rows_are_printed_after_the_bar_is_cleared(terminal, capsys):
    output = _Output(table=True)
    output.show(line=_Line("epoch 0", 3, 6, 1.0, 0.9))
    output.show(line=_Line("epoch 0", 5, 6, 2.0, 0.8))
    output.show(rows=[_row(0, train_loss=0.8)], line=_Line("epoch 0", 6, 6, 2.5, 0.8, "finished"))
    output.show(line=_Line("epoch 1", 0, 6, 0.0))
    output.write("a message")  # LightningModule.print: above the bar, not inside it
    output.show(line=_Line("epoch 1", 2, 6, 0.5, 0.7, "interrupted"))
    raw = capsys.readouterr().out
    lines = screen(raw)
    assert [line.split()[:2] for line in lines[:3]] == [
        ["epoch", "train_loss"],
        ["0", "0.800000"],
        ["a", "message"],
    ]
    assert len(lines) == 4 and lines[3].startswith("epoch 1:") and "2/6" in lines[3]
    # Every piece of output between carriage returns and newlines is a bar or a row, never both.
    for piece in re.split(r"[\r\n]", raw):
        assert not ("|" in piece and re.search(r"\d\.\d{6}", piece)), piece


# ------------------------------------------------------------------------------ in a Trainer
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tick(Callback):
    """Each batch takes ``TICK`` fake seconds; the moments the epoch ends are noted."""

    def __init__(self, clock: FakeClock, notebook: FakeNotebook) -> None:
        self.clock, self.notebook = clock, notebook
        self.updates_at_epoch_end: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock.now += TICK

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.clock.now += TICK

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, pl_module):
        # Runs before LiveProgress (it comes first in the callbacks).
        self.updates_at_epoch_end.append(sum(len(d) for d in self.notebook.displays))


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(6, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("valid_loss", F.cross_entropy(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n_batches: int, batch_size: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * batch_size, 6, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=batch_size)


def _fit(notebook, train, valid=None, epochs=1, **trainer_kwargs):
    clock = FakeClock()
    tick = Tick(clock, notebook)
    recorder = Recorder(log_hypers=False)
    bar = LiveProgress(ProgressTable(recorder), refresh_s=REFRESH, clock=clock)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[tick, recorder, bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(Tiny(), train, valid)
    return tick, recorder, bar, trainer


def test_the_line_is_refreshed_during_the_epoch_at_a_bounded_rate(notebook, monkeypatch):
    reads = []
    to_host = step_loss._to_host
    monkeypatch.setattr(step_loss, "_to_host", lambda losses: reads.append(1) or to_host(losses))
    tick, recorder, bar, trainer = _fit(notebook, _data(100), _data(40))
    assert trainer.progress_bar_callback is bar  # it replaced Lightning's own bar

    [bundles] = notebook.displays
    lines = [parse(text.splitlines()[-1]) for text in notebook.texts()]
    during_epoch = lines[: tick.updates_at_epoch_end[0]]
    # At the epoch's start, then every 16 batches (0.25 fake seconds), not at every batch; then
    # the validation pass (40 batches), once it has lasted 0.25 s; then the finished epoch.
    assert during_epoch == [("epoch 0", done, 100) for done in range(0, 100, 16)] + [
        ("epoch 0 validation", 16, 40),
        ("epoch 0 validation", 32, 40),
    ]
    assert lines[len(during_epoch) :] == [("epoch 0", 100, 100)]
    # The finished display: the table's row above the full bar, marked finished.
    final = bundles[-1]
    assert final["text/plain"].splitlines()[1].split()[0] == "0"
    assert 'value="100" max="100"' in final["text/html"]
    assert 'data-state="finished"' in final["text/html"]
    # The losses left the device once per refresh that had new ones, never once per step.
    # The refreshes at 16, 32, ..., 96 batches and the epoch's end, and the recorder's one read
    # at the epoch's end.
    assert len(reads) == 6 + 1 + 1
    # The smoothed loss: the recorder's smoothing, ending on the table's train_loss.
    ema = SmoothedLoss()
    expected = [ema.update(loss) for loss in tick.losses]
    shown = [float(re.search(r"train_loss=(\S+)]", t).group(1)) for t in notebook.texts()[1:6]]
    assert shown == [pytest.approx(expected[n - 1], rel=1e-3) for n in range(16, 81, 16)]
    assert bar.loss == pytest.approx(recorder.values[-1]["train_loss"], rel=1e-6)


def test_validate_ends_on_the_whole_pass_not_on_the_last_refresh(notebook):
    # 40 batches, refreshed after 16 and 32: the display a notebook keeps says 40/40, finished,
    # not the last refresh's frame (issue 27: "validation: 75%" stayed in the docs).
    clock = FakeClock()
    bar = LiveProgress(None, refresh_s=REFRESH, clock=clock)
    trainer = pl.Trainer(
        callbacks=[Tick(clock, notebook), bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.validate(Tiny(), _data(40), verbose=False)
    assert trainer.progress_bar_callback is bar
    [bundles] = notebook.displays
    lines = [parse(text.splitlines()[-1]) for text in notebook.texts()]
    assert lines == [("validation", 16, 40), ("validation", 32, 40), ("validation", 40, 40)]
    assert 'data-state="finished"' in bundles[-1]["text/html"]
    assert 'data-state="finished"' not in bundles[-2]["text/html"]


def test_with_gradient_accumulation_the_line_smooths_per_optimizer_step(notebook):
    _, recorder, bar, _ = _fit(notebook, _data(30), accumulate_grad_batches=3)
    assert len(recorder.losses) == 10  # optimizer steps
    # The refresh after 16 batches came one batch into the 6th step: it shows 5 steps' curve,
    # and that batch's loss waited for the rest of its step.
    texts = notebook.texts()
    assert parse(texts[1].splitlines()[-1]) == ("epoch 0", 16, 30)
    shown = float(re.search(r"train_loss=(\S+)]", texts[1]).group(1))
    assert shown == pytest.approx(recorder.losses[4], rel=1e-3)
    assert bar.loss == pytest.approx(recorder.losses[-1], rel=1e-6)


class Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            x = torch.randn(2, 6, generator=g)
            yield x, (x[:, 0] > 0).long()


def test_a_loader_without_length_counts_until_it_ends(notebook):
    _fit(notebook, DataLoader(Stream(), batch_size=None))
    lines = [parse(text.splitlines()[-1]) for text in notebook.texts()]
    assert lines[:-1] == [("epoch 0", done, None) for done in range(0, 40, 16)]
    assert lines[-1] == ("epoch 0", 40, 40)  # once it has ended, its length is known


class Fail(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 9:
            raise RuntimeError("boom")


def test_an_error_leaves_the_line_where_training_stopped(notebook):
    bar = LiveProgress(ProgressTable(Recorder(log_hypers=False)), clock=FakeClock())
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[bar, Fail()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Tiny(), _data(100))
    last = notebook.texts()[-1]
    assert last.endswith("stopped by RuntimeError]") and parse(last)[1:] == (10, 100)
    assert 'data-state="interrupted"' in notebook.displays[-1][-1]["text/html"]


def test_refresh_s_must_be_positive():
    for bad in (0, -1.0, math.nan, "fast"):
        with pytest.raises(ValueError, match="refresh_s must be a positive number"):
            LiveProgress(refresh_s=bad)


# ------------------------------------------------------------------------------ the Learner
def _learner(tmp_path, **kwargs) -> Learner:
    """A Learner whose fits show their progress (unless ``enable_progress_bar=False``)."""
    return make_learner(tmp_path, checkpoint=False, **{"enable_progress_bar": True, **kwargs})


def test_each_fit_gets_the_live_line_unless_the_progress_bar_is_off(tmp_path):
    learn = _learner(tmp_path)
    trainer = learn.runner.trainer()
    assert isinstance(trainer.progress_bar_callback, LiveProgress)
    assert trainer.progress_bar_callback.table is learn.runner.table
    assert learn.runner.table not in trainer.callbacks  # the line shows the table's rows

    trainer = _learner(tmp_path, enable_progress_bar=None).runner.trainer()  # Lightning's "on"
    assert isinstance(trainer.progress_bar_callback, LiveProgress)

    trainer = _learner(tmp_path, enable_progress_bar=False).runner.trainer()
    assert trainer.progress_bar_callback is None
    assert any(isinstance(cb, ProgressTable) for cb in trainer.callbacks)

    own = TQDMProgressBar()
    trainer = _learner(tmp_path, callbacks=[own]).runner.trainer()
    assert trainer.progress_bar_callback is own  # the user's bar wins; the table stays
    assert any(isinstance(cb, ProgressTable) for cb in trainer.callbacks)


def test_fine_tune_numbers_its_lines_as_the_table_numbers_its_epochs(tmp_path, notebook):
    learn = _learner(tmp_path)
    learn.fine_tune(1)
    [bundles] = notebook.displays  # one display for the whole call, both Trainers
    labels = [parse(bundle["text/plain"].splitlines()[-1])[0] for bundle in bundles]
    assert labels[0] == "epoch 0" and labels[-1] == "epoch 1"
    # A refresh during an epoch's validation (on a loaded machine) shows "epoch k validation".
    assert sorted({label.removesuffix(" validation") for label in labels}) == ["epoch 0", "epoch 1"]
    table = bundles[-1]["text/plain"].splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["0", "1"]


def test_lr_find_shows_its_iterations_in_a_display_of_its_own(tmp_path, notebook):
    learn = _learner(tmp_path)
    learn.lr_find(num_it=20, stop_div=False, show_plot=False)
    [bundles] = notebook.displays
    assert parse(bundles[-1]["text/plain"]) == ("lr_find", 20, 20)
    assert "<table" not in bundles[-1]["text/html"]  # no epoch table for a sweep

    _learner(tmp_path, enable_progress_bar=False).lr_find(num_it=20, show_plot=False)
    assert len(notebook.displays) == 1  # silent


@pytest.mark.parametrize("columns", [49, 40, 33])
def test_in_a_narrow_terminal_the_line_keeps_the_count_and_the_loss_whole(columns):
    line = _Line("epoch 3", 23, 50, 12.0, loss=0.53214)
    text = line.text(ncols=columns)
    assert len(text) <= columns
    assert text.startswith("epoch 3:") and "23/50" in text and text.endswith("train_loss=0.5321")
    assert line.text(ncols=200).count("█") > 10  # a wide terminal still gets tqdm's bar
    assert "|" in line.text(ncols=100) and "|" not in text  # the bar goes first


def test_a_five_column_table_fits_a_50_column_terminal(terminal, capsys):
    recorder = Recorder(log_hypers=False)
    table = ProgressTable(recorder)
    values = {"train_loss": 0.123456, "valid_loss": 1.5e-5, "accuracy": 0.953125, "time": 3725.0}
    recorder.values.append(_row(12, **values))
    table.on_train_epoch_end(FakeTrainer(), None)
    header, row = capsys.readouterr().out.splitlines()
    assert max(len(header), len(row)) <= 49  # a terminal of 50 columns keeps one free
    assert row.split() == ["12", "0.123456", "1.500e-05", "0.953125", "1:02:05"]
    assert header.split() == ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
