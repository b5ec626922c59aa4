"""Matplotlib figures of a training run: schedules, losses and the LR range test.

matplotlib is imported inside the functions, so ``import difflr`` stays light. The figures are
``matplotlib.figure.Figure`` objects made without ``pyplot``: pyplot never holds a reference to
them (no figure piles up over a long notebook session, and none is shown a second time by
Jupyter's inline backend at the end of a cell). Display one with `show`, or save it with
``fig.savefig(path)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np

from difflr.utils.checks import check_int
from difflr.utils.display import kernel_shell

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from numpy.typing import ArrayLike

__all__ = ["new_figure", "plot_loss", "plot_lr_find", "plot_sched", "show", "shown"]

#: Inches per panel: as wide as a docs page's text column or a notebook cell (700 pixels at
#: matplotlib's 100 dpi), so neither shrinks the figure and its 10-point text stays readable;
#: panels are stacked, one under the other.
_PANEL_SIZE = (7.0, 3.2)


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib ``Figure`` made without pyplot, with a constrained layout, that a Jupyter
    kernel shows once (see `shown`). Every difflr figure starts here.

    Args:
        figsize: Width and height in inches.

    Examples:
        >>> new_figure((4.0, 3.0)).get_size_inches().tolist()
        [4.0, 3.0]
    """
    return _figure_class()(figsize=figsize, layout="constrained")


@functools.cache
def _figure_class() -> type[Figure]:
    """`Figure` that a Jupyter cell shows once: where `shown` displayed it, not again as the
    cell's value (matplotlib is imported only when a figure is made)."""
    from matplotlib.figure import Figure

    class ShownOnceFigure(Figure):
        shown_in: int | None = None  # the kernel's execution count when it was shown

        def _ipython_display_(self) -> None:
            shell = kernel_shell()
            if shell is not None and self.shown_in != getattr(shell, "execution_count", None):
                _display(self, shell)

    return ShownOnceFigure


def shown(fig: Figure) -> Figure:
    """Show ``fig`` inline now when running in a Jupyter kernel (once: returned as the cell's
    value it is not shown again), and return it; in a script or a terminal do nothing but
    return it (save it with ``fig.savefig(path)``). Every difflr plotting call ends here, so a
    plot appears where it is called, as in fastai, also when it is not the cell's last line.
    """
    shell = kernel_shell()
    if shell is not None:
        count = getattr(shell, "execution_count", None)
        if count is None or getattr(fig, "shown_in", None) != count:
            _display(fig, shell)
            fig.shown_in = count
    return fig


def _axes_row(n_axes: int) -> tuple[Figure, list[Any]]:
    fig = new_figure((_PANEL_SIZE[0], _PANEL_SIZE[1] * n_axes))
    return fig, list(fig.subplots(n_axes, 1, squeeze=False)[:, 0])


def _png_bytes(fig: Figure) -> bytes:
    buffer = BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _as_array(values: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """``values`` as a float64 array of ``ndim`` dimensions; for ``ndim=2`` a 1-D array becomes
    one column (one layer group)."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be an array of numbers; got {type(values).__name__}: {error}"
        ) from error
    if ndim == 2 and array.ndim == 1:
        array = array[:, None]
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {array.shape}.")
    return array


def _check_count(value: int, name: str) -> None:
    check_int(value, name, 0, what="steps")


def plot_sched(
    lrs: ArrayLike,
    moms: ArrayLike | None = None,
    names: Sequence[str] | None = None,
    boundaries: Sequence[int] = (),
    trainable: Sequence[Sequence[bool]] | None = None,
) -> Figure:
    """Plot every layer group's learning rate and momentum at each optimizer step.

    The left axes show the LRs on a log scale, one line per group, with a legend of the group
    names; the right axes show the momentum (SGD ``momentum`` or Adam's ``beta1``), one line per
    group. Dashed vertical lines mark ``boundaries``, the first step of each fit after the first.
    An LR of 0 (the original milestone plans give frozen groups 0) has no place on a log axis and
    is left out; with ``trainable``, the stretches where a group is frozen are drawn faint and
    dotted, so a line neither plunges to the axis floor nor looks like training.

    Args:
        lrs: LR per step and group, shape ``(n_steps, n_groups)``; a 1-D array is one group.
        moms: Momentum per step and group, the shape of ``lrs``. ``None`` or all-NaN (an
            optimizer without momentum) leaves the momentum axes out.
        names: One name per group, e.g. ``["0.stem", "1.head"]``; default ``"group 0"``, ...
        boundaries: Steps at which a new fit or stage starts.
        trainable: For the first fit and each boundary, which groups train (a list per fit, as
            ``Recorder.trainable``); ``None`` draws every stretch as training.

    Returns:
        The figure, with one axes (no momentum) or two.

    Raises:
        ValueError: If the shapes of ``lrs`` and ``moms`` differ, ``lrs`` has no step, or
            ``names`` does not have one name per group.

    Examples:
        >>> fig = plot_sched([[1e-4, 1e-3], [2e-4, 2e-3]], names=["stem", "head"])
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['stem', 'head']
    """
    lr_array = _as_array(lrs, "lrs", ndim=2)
    n_steps, n_groups = lr_array.shape
    if n_steps == 0:
        raise ValueError("lrs has no step to plot; fit the model first.")
    group_names = [f"group {i}" for i in range(n_groups)] if names is None else list(names)
    if len(group_names) != n_groups:
        raise ValueError(
            f"names has {len(group_names)} entries but lrs has {n_groups} groups (columns); "
            "pass one name per layer group."
        )
    mom_array = None
    if moms is not None:
        mom_array = _as_array(moms, "moms", ndim=2)
        if mom_array.shape != lr_array.shape:
            raise ValueError(
                f"moms has shape {mom_array.shape} but lrs has shape {lr_array.shape}; pass one "
                "momentum per step and group, or moms=None."
            )
        if np.isnan(mom_array).all():
            mom_array = None

    trains = _trainable_mask(trainable, boundaries, n_steps, n_groups)
    fig, axes = _axes_row(1 if mom_array is None else 2)
    steps = np.arange(n_steps)
    lr_ax = axes[0]
    positive = np.where(lr_array > 0, lr_array, np.nan)
    for group, name in enumerate(group_names):
        (line,) = lr_ax.plot(
            steps, np.where(trains[:, group], positive[:, group], np.nan), label=name
        )
        if not trains[:, group].all():
            frozen = np.where(trains[:, group], np.nan, positive[:, group])
            lr_ax.plot(steps, frozen, color=line.get_color(), linestyle=":", alpha=0.5)
    lr_ax.set_yscale("log")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.set_ylabel("learning rate")
    lr_ax.legend(loc="best")
    if mom_array is not None:
        mom_ax = axes[1]
        for group, name in enumerate(group_names):
            mom_ax.plot(steps, mom_array[:, group], label=name)
        mom_ax.set_xlabel("optimizer step")
        mom_ax.set_ylabel("momentum")
    for ax in axes:
        for step in boundaries:
            ax.axvline(step, color="grey", linestyle="--", linewidth=1)
    return shown(fig)


def _trainable_mask(
    trainable: Sequence[Sequence[bool]] | None,
    boundaries: Sequence[int],
    n_steps: int,
    n_groups: int,
) -> np.ndarray:
    """``(n_steps, n_groups)`` flags from one row of flags per fit (the first starts at 0)."""
    mask = np.ones((n_steps, n_groups), dtype=bool)
    if trainable is None:
        return mask
    starts = [0, *boundaries]
    if len(trainable) != len(starts):
        raise ValueError(
            f"trainable has {len(trainable)} rows but there are {len(starts)} fits (boundaries "
            f"{list(boundaries)}); pass one row of flags per fit."
        )
    for start, end, flags in zip(starts, [*starts[1:], n_steps], trainable):
        mask[start:end] = np.asarray(flags, dtype=bool)
    return mask


def plot_loss(
    losses: ArrayLike,
    valid_losses: Sequence[tuple[int, float]] = (),
    skip_start: int = 0,
) -> Figure:
    """Plot the smoothed training loss at each optimizer step, and the validation losses.

    Args:
        losses: Smoothed training loss per step, shape ``(n_steps,)`` (``Recorder.losses``).
        valid_losses: ``(step, loss)`` pairs, e.g. one per epoch at its last step.
        skip_start: Steps left out at the start (the first losses are often far higher).

    Returns:
        The figure: a ``"train"`` line at steps ``skip_start ... n_steps - 1`` and, when there
        are any at or after ``skip_start``, ``"valid"`` points joined by a line.

    Raises:
        ValueError: If ``losses`` is empty, ``skip_start`` is not in ``[0, n_steps)``, or a
            validation entry is not a ``(step, loss)`` pair.

    Examples:
        >>> fig = plot_loss([2.0, 1.5, 1.2, 1.0], valid_losses=[(1, 1.6), (3, 1.1)])
        >>> fig.axes[0].get_lines()[1].get_xydata().tolist()
        [[1.0, 1.6], [3.0, 1.1]]
    """
    loss_array = _as_array(losses, "losses", ndim=1)
    _check_count(skip_start, "skip_start")
    if len(loss_array) == 0:
        raise ValueError("losses is empty; there is no training loss to plot. Fit first.")
    if skip_start >= len(loss_array):
        raise ValueError(
            f"skip_start={skip_start} leaves nothing of the {len(loss_array)} recorded steps; "
            f"pass a skip_start below {len(loss_array)}."
        )
    try:
        pairs = [(float(step), float(loss)) for step, loss in valid_losses]
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"valid_losses must be (step, loss) pairs; got {valid_losses!r}. "
            "Pass e.g. [(99, 0.52), (199, 0.41)]."
        ) from error
    valid_array = np.array(pairs, dtype=np.float64).reshape(-1, 2)
    valid_array = valid_array[valid_array[:, 0] >= skip_start]

    fig, (ax,) = _axes_row(1)
    ax.plot(np.arange(skip_start, len(loss_array)), loss_array[skip_start:], label="train")
    if len(valid_array):
        ax.plot(valid_array[:, 0], valid_array[:, 1], marker="o", label="valid")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="best")
    return shown(fig)


def plot_lr_find(
    lrs: ArrayLike,
    losses: ArrayLike,
    suggestions: Mapping[str, tuple[float, float]] | None = None,
    skip_end: int = 5,
) -> Figure:
    """Plot the loss against the learning rate of an LR range test, with the suggestions.

    Args:
        lrs: Learning rate at each sweep iteration, shape ``(n,)``.
        losses: Smoothed loss at each iteration, shape ``(n,)``; non-finite values leave gaps.
        suggestions: ``{name: (lr, loss)}``, the points ``make_suggestions`` returns. Each one
            is marked and labelled ``"name: 1.9e-04"`` in the legend; points that are not
            finite are left out.
        skip_end: Iterations left out at the end, where the loss diverges.

    Returns:
        The figure: the curve first, then one marker line per suggestion; log-scaled LR axis.

    Raises:
        ValueError: If the lengths differ or ``skip_end`` leaves no point.

    Examples:
        >>> fig = plot_lr_find([1e-4, 1e-3, 1e-2], [1.0, 0.5, 2.0], {"valley": (1e-3, 0.5)}, 0)
        >>> fig.axes[0].get_legend().get_texts()[0].get_text()
        'valley: 1.0e-03'
    """
    lr_array = _as_array(lrs, "lrs", ndim=1)
    loss_array = _as_array(losses, "losses", ndim=1)
    if len(lr_array) != len(loss_array):
        raise ValueError(
            f"lrs has {len(lr_array)} values but losses has {len(loss_array)}; pass one loss "
            "per learning rate."
        )
    _check_count(skip_end, "skip_end")
    stop = len(lr_array) - skip_end
    if stop <= 0:
        raise ValueError(
            f"skip_end={skip_end} leaves nothing of the {len(lr_array)} points; pass a "
            f"skip_end below {len(lr_array)}."
        )

    fig, (ax,) = _axes_row(1)
    curve_losses = np.where(np.isfinite(loss_array[:stop]), loss_array[:stop], np.nan)
    ax.plot(lr_array[:stop], curve_losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    marked = 0
    for name, (lr, loss) in (suggestions or {}).items():
        if not (math.isfinite(lr) and lr > 0 and math.isfinite(loss)):
            continue
        marked += 1
        # Colour C0 is the curve's; each suggestion takes the next colour of the cycle.
        ax.plot(
            [lr],
            [loss],
            marker="o",
            linestyle="none",
            color=f"C{marked}",
            label=f"{name}: {lr:.1e}",
        )
    if marked:
        ax.legend(loc="best")
    return shown(fig)


def show(fig: Figure) -> None:
    """Display ``fig`` inline when running in a Jupyter (IPython) kernel, once per cell (a plot
    difflr made has shown itself already); else do nothing.

    In a plain script or a terminal IPython this returns at once (it never opens a window or
    blocks): save the figure with ``fig.savefig(path)`` there. IPython need not be installed.

    Args:
        fig: The figure to display.
    """
    shown(fig)


def _display(fig: Figure, shell: Any) -> None:
    from IPython.display import Image, display

    # Through the kernel's own figure formatters when pyplot's inline backend has registered
    # them (the user's format and dpi); they are looked up on matplotlib's Figure class, since
    # this figure's own display hook is what called here.
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None) or {}
    data = {}
    for mime, formatter in formatters.items():
        if mime == "text/plain" or not getattr(formatter, "enabled", True):
            continue
        try:
            render = formatter.lookup_by_type(_base_figure_class())
        except (KeyError, AttributeError):
            continue
        output = render(fig)
        if output is not None:
            data[mime] = output
    if data:
        display({"text/plain": repr(fig), **data}, raw=True)
    else:  # the inline backend registers its formatters only once pyplot is imported
        display(Image(data=_png_bytes(fig), format="png"))


def _base_figure_class() -> type[Figure]:
    from matplotlib.figure import Figure

    return Figure
