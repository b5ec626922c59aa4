"""Progress as training runs: the per-epoch table and a live line for the running epoch.

In a Jupyter kernel, one output per fit call holds both, updated in place: the table (HTML) and
under it a progress bar with the batches done, the elapsed and remaining time and the smoothed
training loss. In a terminal the line is a tqdm bar and the table's rows are printed above it,
each on a line of its own (the bar is cleared first, never written into). Only rank 0 shows
anything.

`ProgressTable` is the table alone (``enable_progress_bar=False``); `LiveProgress` is Lightning's
progress bar for a Trainer (it replaces Lightning's own) and shows a table's rows with its line.
"""

from __future__ import annotations

import html
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress import ProgressBar
from tqdm import tqdm
from typing_extensions import override

from difflr.callbacks.recorder import Recorder
from difflr.callbacks.step_loss import StepLosses
from difflr.utils.display import in_notebook, terminal_width

__all__ = ["REFRESH_S", "LiveProgress", "ProgressTable", "format_time"]

#: Seconds between two refreshes of the live line: a few times a second at most, so that the
#: cost of a refresh (a device read of the pending losses, a message to the notebook) is spread
#: over many steps.
REFRESH_S = 0.25

State = Literal["running", "finished", "interrupted"]

#: The widest value of a table column, by name (others: a float, 9 characters).
_VALUE_WIDTH = {"epoch": 5, "time": 7}


def format_time(seconds: float) -> str:
    """A duration as fastai's epoch table shows it: ``mm:ss``, or ``h:mm:ss`` from an hour on.

    Examples:
        >>> format_time(19.53), format_time(3725.0)
        ('00:19', '1:02:05')
    """
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _format(value: Any, column: str = "") -> str:
    if column == "time" and isinstance(value, float) and math.isfinite(value):
        return format_time(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.6f}" if abs(value) >= 1e-3 else f"{value:.3e}"
    return str(value)


# The line without its bar (HTML draws its own), then ever narrower terminal lines.
_NO_BAR = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_NARROW = (
    "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
    "{desc}: {n_fmt}/{total_fmt}{postfix}",
)


@dataclass(frozen=True)
class _Line:
    """What the live line shows: ``label: done/total [elapsed<remaining, rate, train_loss=...]``."""

    label: str
    done: int
    total: int | None  # None: a loader without a length (a count, no total)
    elapsed: float  # seconds
    loss: float | None = None
    state: State = "running"
    note: str | None = None  # why an interrupted line stopped

    def text(self, bar: bool = True, ncols: int | None = None) -> str:
        """tqdm's text for this line; ``bar=False`` leaves the bar out (HTML draws its own).

        In ``ncols`` columns (a narrow terminal) the line drops, in turn, the bar, the rate and
        the times, so that the count and the loss stay whole; only a line that does not fit even
        then is cut.
        """
        extras = [] if self.loss is None else [f"train_loss={self.loss:.4g}"]
        if self.state == "interrupted":
            extras.append(self.note or "interrupted")
        postfix = ", ".join(extras) or None

        def meter(bar_format: str | None, width: int | None = None) -> str:
            return tqdm.format_meter(
                self.done,
                self.total,
                self.elapsed,
                ncols=width,
                prefix=self.label,
                postfix=postfix,
                bar_format=bar_format,
            )

        if not bar and self.total is not None:
            return meter(_NO_BAR)
        if ncols is None or self.total is None or len(meter(None)) <= ncols:
            return meter(None, ncols)  # tqdm's own line, its bar filling what is left
        for bar_format in _NARROW:
            text = meter(bar_format)
            if len(text) <= ncols:
                return text
        return text[:ncols]

    def html(self) -> str:
        # An indeterminate <progress> (no value) for a loader without a length.
        value = "" if self.total is None else f' value="{self.done}" max="{max(self.total, 1)}"'
        return (
            f'<div><progress{value} style="width:300px;height:16px;vertical-align:middle">'
            f"</progress> <span>{html.escape(self.text(bar=False))}</span></div>"
        )


class _Output:
    """One display: the table's rows and the live line, in a notebook or a terminal.

    In a notebook, a single output (``display_id``) re-rendered whole at each change. In a
    terminal, rows are printed once each, and the line is a tqdm bar that is closed before
    rows are printed under a finished epoch, so that no row is ever written into a bar line.

    Args:
        table: Rows will be shown: in a terminal a finished line is then cleared (its row
            replaces it) instead of being left on screen.
    """

    def __init__(self, table: bool) -> None:
        self.notebook = in_notebook()
        self.table = table
        self.columns: list[str] = []
        self.rows: list[dict[str, float]] = []
        self.line: _Line | None = None
        self._handle: Any = None  # notebook: the display handle
        self._printed = 0  # terminal: rows printed so far
        self._bar: Any = None  # terminal: the tqdm bar showing the running line

    def show(
        self, rows: Sequence[dict[str, float]] | None = None, line: _Line | None = None
    ) -> None:
        """Show new ``rows`` (the whole table so far) and/or a new ``line``, at once."""
        if rows:
            self.rows = list(rows)
            self.columns = self.columns or list(rows[-1])
        if line is not None:
            self.line = line
        if self.notebook:
            self._render()
            return
        if line is not None:
            self._draw(line)
        if rows:
            self._print_rows()

    def write(self, text: str, end: str = "\n", file: Any = None) -> None:
        """Print ``text`` without breaking the bar (terminal) or as a plain print (notebook)."""
        if self.notebook:
            print(text, end=end, file=file)
        else:
            tqdm.write(text, file=file or sys.stdout, end=end)

    # ------------------------------------------------------------------------------ notebook
    def _render(self) -> None:
        from IPython.display import display

        bundle = {"text/plain": self.text(), "text/html": self.html()}
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)

    def html(self) -> str:
        parts = []
        if self.columns:
            head = "".join(f"<th>{c}</th>" for c in self.columns)
            body = "".join(
                "<tr>"
                + "".join(f"<td>{_format(r.get(c, math.nan), c)}</td>" for c in self.columns)
                + "</tr>"
                for r in self.rows
            )
            parts.append(
                f'<table border="1" class="dataframe"><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>"
            )
        if self.line is not None:
            parts.append(self.line.html())
        state = "" if self.line is None else f' data-state="{self.line.state}"'
        return f'<div class="difflr-progress"{state}>{"".join(parts)}</div>'

    def text(self) -> str:
        """The whole display as plain text: the table's lines, then the line."""
        lines = self._table_lines(0) if self.columns else []
        if self.line is not None:
            lines.append(self.line.text())
        return "\n".join(lines)

    def _table_lines(self, first: int) -> list[str]:
        # Each column as wide as its name or its widest value (a float shows as 0.123456 or
        # 1.234e-05, a time as mm:ss): five columns fit a 50-column terminal.
        widths = [max(len(c), _VALUE_WIDTH.get(c, 9)) for c in self.columns]
        lines = ["  ".join(c.rjust(w) for c, w in zip(self.columns, widths))] if first == 0 else []
        for row in self.rows[first:]:
            lines.append(
                "  ".join(
                    _format(row.get(c, math.nan), c).rjust(w) for c, w in zip(self.columns, widths)
                )
            )
        return lines

    # ------------------------------------------------------------------------------ terminal
    def _draw(self, line: _Line) -> None:
        stream = sys.stdout
        text = line.text(ncols=terminal_width(stream))
        if line.state == "running":
            if self._bar is None:
                # The bar only carries our text: its clock and counts are not used, so the
                # terminal shows exactly what a notebook shows.
                self._bar = tqdm(
                    desc=text, bar_format="{desc}", file=stream, leave=False, dynamic_ncols=True
                )
            else:
                self._bar.set_description_str(text)
            return
        # A finished line is replaced by its row when there is a table, else left on screen, as
        # is an interrupted one (it says where training stopped).
        keep = line.state == "interrupted" or not self.table
        if self._bar is not None:
            self._bar.set_description_str(text, refresh=keep)
            self._bar.leave = keep
            self._bar.close()
            self._bar = None
        elif keep:
            tqdm.write(text, file=stream)

    def _print_rows(self) -> None:
        for text in self._table_lines(self._printed):
            tqdm.write(text, file=sys.stdout)
        self._printed = len(self.rows)


class ProgressTable(Callback):
    """Show the recorder's per-epoch rows (epoch, train_loss, valid_loss, metrics, time).

    In a Jupyter kernel the table is one HTML output updated in place; in a terminal each epoch
    prints one line (the header once per table). Only rank 0 shows anything. `LiveProgress`
    shows the same table with a live line under it.

    Args:
        recorder: Where the rows come from (it must run before this callback).
    """

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._output: _Output | None = None

    def start(self) -> None:
        """Begin a new table in a new display (a Learner does this at each public fit call)."""
        self._output = None

    @property
    def output(self) -> _Output:
        """The current display (made at first use after `start`)."""
        if self._output is None:
            self._output = _Output(table=True)
        return self._output

    def handback_state(self) -> _Output | None:
        """What a worker process (``ddp_notebook``) hands back: the display so far (the rows
        it printed), so that the next stage of a plan goes on under it."""
        if self._output is not None and self._output._bar is not None:
            return None  # a bar still open (an interrupted epoch): start afresh
        return self._output

    def load_handback_state(self, state: _Output | None) -> None:
        """Take a worker's display as this one."""
        self._output = state

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Showing the same rows again shows nothing new (a terminal prints each row once).
        if trainer.is_global_zero and self.recorder.values:
            self.output.show(rows=self.recorder.values)


class LiveProgress(ProgressBar):
    """Lightning's progress bar, difflr's way: the running epoch as a live line, under the table.

    The line shows the batches done of the epoch's total (a count for a loader without a
    length), the elapsed and estimated remaining time and the smoothed training loss
    (read by `difflr.callbacks.step_loss.StepLosses`, as the recorder reads it, so it ends on
    the table's ``train_loss``).
    It is refreshed at most every ``refresh_s`` seconds, plus at each epoch's start and end. A
    step costs a counter, a clock read and keeping a reference to the loss tensor: the losses
    are read from the device only at a refresh, all at once. A validation pass that lasts
    longer than ``refresh_s`` gets its own count on the line.

    With a ``table``, the table and the line are one display: in a Jupyter kernel one output
    updated in place, in a terminal the table's rows printed between tqdm bars (never into one).
    A Trainer limited by ``max_steps`` alone (``max_epochs=-1``, as ``lr_find``'s) gets one line
    counting optimizer steps over the whole run. Only rank 0 shows anything.

    Args:
        table: The epoch table to show with the line; ``None`` for the line alone.
        label: What the line calls the run; ``None``: ``epoch N``, numbered as the table
            numbers them (``fine_tune``'s second phase starts at epoch ``freeze_epochs``).
        refresh_s: Seconds between two refreshes of the line (> 0).
        clock: A monotonic clock in seconds (tests pass a fake one).

    Raises:
        ValueError: ``refresh_s`` is not a positive number.

    Examples:
        >>> recorder = Recorder()
        >>> bar = LiveProgress(ProgressTable(recorder))
        >>> # trainer = pl.Trainer(callbacks=[recorder, bar]); trainer.fit(module, ...)
    """

    def __init__(
        self,
        table: ProgressTable | None = None,
        *,
        label: str | None = None,
        refresh_s: float = REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if not (isinstance(refresh_s, (int, float)) and math.isfinite(refresh_s) and refresh_s > 0):
            raise ValueError(
                f"refresh_s must be a positive number of seconds, got {refresh_s!r}; e.g. "
                f"refresh_s={REFRESH_S}."
            )
        self.table = table
        self.label = label
        self.refresh_s = float(refresh_s)
        self._clock = clock
        self._enabled = True
        self._own: _Output | None = None
        self._begin_run()

    def _begin_run(self) -> None:
        self._step_losses = StepLosses()  # read at each refresh
        self._loss: float | None = None
        self._steps = 0
        self._by_steps = False
        self._first_step = 0
        self._max_steps: int | None = None
        self._run_start = self._epoch_start = self._clock()
        self._epoch_label = self.label or "training"
        self._done = 0
        self._total: int | None = None
        self._next_refresh = -math.inf
        self._validating = False
        self._val_shown = False
        self._val_label = "validation"
        self._val_start = 0.0
        self._val_done = 0
        self._val_total: int | None = None
        self._line: _Line | None = None

    # ------------------------------------------------------------------ Lightning's ProgressBar
    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        """Whether the line is shown (not on ranks other than 0, nor while Lightning's tuners
        disable the bar)."""
        return self._enabled

    @override
    def print(
        self, *args: Any, sep: str = " ", end: str = "\n", file: Any = None, flush: bool = False
    ) -> None:
        """``print`` that does not break the bar (``LightningModule.print`` comes here)."""
        self._output().write(sep.join(map(str, args)), end=end, file=file)

    def _output(self) -> _Output:
        if self.table is not None:
            return self.table.output
        if self._own is None:
            self._own = _Output(table=False)
        return self._own

    # ------------------------------------------------------------------------------ training
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._own = None  # without a table, each fit gets its own display
        self._begin_run()
        self._by_steps = trainer.max_epochs == -1 and (trainer.max_steps or -1) > 0
        if self._by_steps:
            self._first_step = trainer.global_step
            self._max_steps = trainer.max_steps

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled or (self._by_steps and trainer.current_epoch > 0):
            return
        offset = self.table.recorder.epoch_offset if self.table is not None else 0
        epoch = "training" if self._by_steps else f"epoch {offset + trainer.current_epoch}"
        self._epoch_label = self.label or epoch
        self._epoch_start = self._clock()
        self._done = 0
        self._total = _finite(trainer.num_training_batches)
        self._refresh()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._steps += 1
        if self._enabled:
            self._step_losses.step()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._enabled:
            return
        # Per step: no device read, no formatting; a refresh does those for all steps since.
        self._step_losses.batch_end(outputs, trainer.accumulate_grad_batches)
        self._done = batch_idx + 1
        if self._clock() >= self._next_refresh:
            self._refresh()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        line = None
        if self._enabled and not self._by_steps:
            line = self._line = self._current_line(self._clock(), "finished")
        rows = None
        if self.table is not None and trainer.is_global_zero:
            rows = self.table.recorder.values
        if line is not None or rows:
            # One update: in a terminal the bar is cleared before the row is printed.
            self._output().show(rows=rows, line=line)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and self._line is not None and self._line.state == "running":
            self._refresh("finished")

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._enabled and self._line is not None and self._line.state == "running":
            note = "interrupted"
            if not isinstance(exception, KeyboardInterrupt):
                note = f"stopped by {type(exception).__name__}"
            self._refresh("interrupted", note)

    # ------------------------------------------------------------------------------ validation
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validating, self._val_shown = True, False
        self._val_start, self._val_done = self._clock(), 0
        if trainer.sanity_checking:
            self._val_label, batches = "sanity check", trainer.num_sanity_val_batches
        else:
            fitting = trainer.state.fn == "fit"
            self._val_label = f"{self._epoch_label} validation" if fitting else "validation"
            batches = trainer.num_val_batches
        self._val_total = _finite(sum(batches))

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._val_done += 1
        if not self._enabled:
            return
        now = self._clock()
        # Shown only once it has lasted a refresh interval: short passes do not flicker.
        if now >= self._next_refresh and now - self._val_start >= self.refresh_s:
            self._val_shown = True
            self._refresh()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        shown = self._enabled and self._val_shown
        if shown and (trainer.state.fn != "fit" or trainer.sanity_checking):
            # A pass on its own (validate(), the sanity check): its last line counts the whole
            # pass, not the last refresh's frame, which a notebook or a saved page would keep
            # ("validation 12/16").
            self._output().show(line=self._current_line(self._clock(), "finished"))
        self._validating = False
        in_epoch = self._total is None or self._done < self._total
        if shown and trainer.state.fn == "fit" and not trainer.sanity_checking and in_epoch:
            self._refresh()  # back to the training line (a validation inside the epoch)

    # ------------------------------------------------------------------------------ refresh
    def _refresh(self, state: State = "running", note: str | None = None) -> None:
        now = self._clock()
        self._next_refresh = now + self.refresh_s
        self._line = replace(self._current_line(now, state), note=note)
        self._output().show(line=self._line)

    def _current_line(self, now: float, state: State) -> _Line:
        if self._validating:
            elapsed = now - self._val_start
            return _Line(self._val_label, self._val_done, self._val_total, elapsed, None, state)
        if self._by_steps:  # the whole run: optimizer steps of max_steps
            done, total, start = self._first_step + self._steps, self._max_steps, self._run_start
        else:  # this epoch: its batches
            done, total, start = self._done, self._total, self._epoch_start
        if state == "finished" and total is None:
            total = done  # the loader ended: its length is known now
        loss = self._smoothed_loss()
        return _Line(self._epoch_label, done, total, now - start, loss, state)

    def _smoothed_loss(self) -> float | None:
        """Bring the losses since the last refresh to the host (one read) and smooth them per
        optimizer step, as the recorder does."""
        self._step_losses.read()
        if self._step_losses.ema.count:  # a step with a loss was read
            self._loss = self._step_losses.last
        return self._loss

    @property
    def loss(self) -> float | None:
        """The smoothed training loss at the last refresh (``None`` before any)."""
        return self._loss


def _finite(n: float) -> int | None:
    return int(n) if math.isfinite(n) else None
