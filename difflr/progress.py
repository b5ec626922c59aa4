"""The per-epoch results table: an HTML table updated in place in Jupyter, plain text elsewhere."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from difflr.callbacks import Recorder
from difflr.display import in_notebook


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.6f}" if abs(value) >= 1e-3 else f"{value:.3e}"
    return str(value)


class ProgressTable(Callback):
    """Show the recorder's per-epoch rows (epoch, train_loss, valid_loss, metrics, time).

    In a Jupyter kernel the table is one HTML output updated in place; in a terminal each epoch
    prints one line (the header once per table). Only rank 0 shows anything.

    Args:
        recorder: Where the rows come from (it must run before this callback).
    """

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._handle: Any = None
        self._shown = 0
        self._columns: list[str] = []

    def start(self) -> None:
        """Begin a new table (a Learner does this at each public fit call)."""
        self._handle = None
        self._shown = 0
        self._columns = []

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.recorder.values:
            return
        rows = self.recorder.values
        if not self._columns:
            self._columns = list(rows[-1])
        if in_notebook():
            self._show_html(rows)
        else:
            self._print_text(rows)

    def _show_html(self, rows: list[dict[str, float]]) -> None:
        from IPython.display import HTML, display

        head = "".join(f"<th>{c}</th>" for c in self._columns)
        body = "".join(
            "<tr>"
            + "".join(f"<td>{_format(r.get(c, math.nan))}</td>" for c in self._columns)
            + "</tr>"
            for r in rows
        )
        html = HTML(
            f'<table border="1" class="dataframe"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>"
        )
        if self._handle is None:
            self._handle = display(html, display_id=True)
        else:
            self._handle.update(html)

    def _print_text(self, rows: list[dict[str, float]]) -> None:
        width = max(10, *(len(c) for c in self._columns))
        if self._shown == 0:
            print("  ".join(c.rjust(width) for c in self._columns))
        for row in rows[self._shown :]:
            print("  ".join(_format(row.get(c, math.nan)).rjust(width) for c in self._columns))
        self._shown = len(rows)
