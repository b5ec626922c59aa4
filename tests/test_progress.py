"""The per-epoch table: one HTML output updated in place in Jupyter, text lines elsewhere."""

from __future__ import annotations

import math

import pytest

from difflr import progress
from difflr.callbacks import Recorder
from difflr.progress import ProgressTable


class FakeHandle:
    def __init__(self):
        self.updates = []

    def update(self, obj):
        self.updates.append(obj.data)


class FakeTrainer:
    is_global_zero = True


def _new_table() -> tuple[ProgressTable, Recorder]:
    recorder = Recorder(log_hypers=False)
    table = ProgressTable(recorder)
    table.start()
    return table, recorder


def test_in_a_notebook_the_table_is_displayed_once_and_updated_in_place(monkeypatch):
    IPython = pytest.importorskip("IPython.display")
    shown = []
    handle = FakeHandle()

    def fake_display(obj, display_id=False):
        shown.append(obj.data)
        return handle

    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(IPython, "display", fake_display)
    table, recorder = _new_table()
    for epoch in range(3):
        recorder.values.append(
            {
                "epoch": float(epoch),
                "train_loss": 1.0 / (epoch + 1),
                "valid_loss": math.nan,
                "time": 0.5,
            }
        )
        table.on_train_epoch_end(FakeTrainer(), None)
    assert len(shown) == 1 and len(handle.updates) == 2
    assert handle.updates[-1].count("<tr>") == 4  # header + 3 epochs
    assert "<th>train_loss</th>" in shown[0] and "<td>0.333333</td>" in handle.updates[-1]
    assert "<td>—</td>" in shown[0]  # NaN shows as a dash


def test_in_a_terminal_each_epoch_prints_one_line_under_one_header(monkeypatch, capsys):
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    table, recorder = _new_table()
    for epoch in range(2):
        recorder.values.append({"epoch": float(epoch), "train_loss": 0.5, "time": 1.25})
        table.on_train_epoch_end(FakeTrainer(), None)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["epoch", "train_loss", "time"],
        ["0", "0.500000", "1.250000"],
        ["1", "0.500000", "1.250000"],
    ]


def test_other_ranks_show_nothing(monkeypatch, capsys):
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    table, recorder = _new_table()
    recorder.values.append({"epoch": 0.0, "train_loss": 0.5})
    trainer = FakeTrainer()
    trainer.is_global_zero = False
    table.on_train_epoch_end(trainer, None)
    assert capsys.readouterr().out == ""
