"""Figures read back through their lines' data under the Agg backend; `show` with fake IPythons."""

from __future__ import annotations

import io
import pathlib
import sys
import types
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from difflr.plotting import plot_loss, plot_lr_find, plot_sched, show

matplotlib.use("Agg")  # pyplot picks its backend lazily, so this still applies

ROOT = pathlib.Path(__file__).resolve().parents[1]


def legend_texts(ax: Any) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def one_cycle_like(n_steps: int = 50, n_groups: int = 3) -> tuple[np.ndarray, np.ndarray]:
    pct = np.linspace(0, 1, n_steps)[:, None]
    lrs = (1e-3 * np.sin(np.pi * pct) + 1e-5) * np.logspace(-2, 0, n_groups)[None, :]
    moms = np.broadcast_to(0.95 - 0.1 * np.sin(np.pi * pct), (n_steps, n_groups)).copy()
    return lrs, moms


# --------------------------------------------------------------------------------------------
# plot_sched
# --------------------------------------------------------------------------------------------


def test_plot_sched_draws_one_lr_and_one_momentum_line_per_group() -> None:
    lrs, moms = one_cycle_like()
    names = ["0.stem", "1.body", "2.head"]
    fig = plot_sched(lrs, moms, names)
    assert isinstance(fig, Figure)
    lr_ax, mom_ax = fig.axes
    for group in range(3):
        lr_line, mom_line = lr_ax.get_lines()[group], mom_ax.get_lines()[group]
        np.testing.assert_array_equal(lr_line.get_xdata(), np.arange(50))
        np.testing.assert_array_equal(lr_line.get_ydata(), lrs[:, group])
        np.testing.assert_array_equal(mom_line.get_ydata(), moms[:, group])
    assert legend_texts(lr_ax) == names
    assert lr_ax.get_yscale() == "log"
    assert mom_ax.get_yscale() == "linear"
    assert (lr_ax.get_xlabel(), lr_ax.get_ylabel()) == ("optimizer step", "learning rate")
    assert mom_ax.get_ylabel() == "momentum"


def test_plot_sched_marks_each_boundary_with_a_dashed_line_on_both_axes() -> None:
    lrs, moms = one_cycle_like()
    fig = plot_sched(lrs, moms, ["a", "b", "c"], boundaries=[20, 35])
    for ax in fig.axes:
        boundary_lines = ax.get_lines()[3:]
        assert [line.get_xdata()[0] for line in boundary_lines] == [20, 35]
        assert all(line.get_linestyle() == "--" for line in boundary_lines)
    assert legend_texts(fig.axes[0]) == ["a", "b", "c"]  # boundaries stay out of the legend


@pytest.mark.parametrize("moms", [None, np.full((50, 3), np.nan)], ids=["none", "all-nan"])
def test_plot_sched_leaves_out_the_momentum_axes_without_momentum(moms: Any) -> None:
    lrs, _ = one_cycle_like()
    fig = plot_sched(lrs, moms, ["a", "b", "c"])
    assert len(fig.axes) == 1
    assert len(fig.axes[0].get_lines()) == 3


def test_plot_sched_takes_a_1d_array_as_one_group_with_a_default_name() -> None:
    fig = plot_sched(np.array([1e-4, 1e-3, 1e-4]))
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_ydata(), [1e-4, 1e-3, 1e-4])
    assert legend_texts(fig.axes[0]) == ["group 0"]


def test_plot_sched_rejects_mismatched_names_and_shapes() -> None:
    lrs, moms = one_cycle_like()
    with pytest.raises(ValueError, match="names has 2 entries but lrs has 3 groups"):
        plot_sched(lrs, moms, ["a", "b"])
    with pytest.raises(ValueError, match=r"moms has shape \(49, 3\) but lrs has shape \(50, 3\)"):
        plot_sched(lrs, moms[:-1], ["a", "b", "c"])
    with pytest.raises(ValueError, match="lrs has no step to plot"):
        plot_sched(np.empty((0, 2)), None, ["a", "b"])


# --------------------------------------------------------------------------------------------
# plot_loss
# --------------------------------------------------------------------------------------------


def test_plot_loss_draws_train_losses_and_validation_points() -> None:
    losses = np.linspace(2.0, 0.5, 30)
    fig = plot_loss(losses, valid_losses=[(9, 1.6), (19, 1.1), (29, 0.7)])
    (ax,) = fig.axes
    train, valid = ax.get_lines()
    np.testing.assert_array_equal(train.get_xdata(), np.arange(30))
    np.testing.assert_array_equal(train.get_ydata(), losses)
    np.testing.assert_array_equal(valid.get_xydata(), [[9, 1.6], [19, 1.1], [29, 0.7]])
    assert valid.get_marker() == "o"
    assert legend_texts(ax) == ["train", "valid"]


def test_plot_loss_skip_start_drops_early_steps_and_early_validation_points() -> None:
    losses = np.linspace(2.0, 0.5, 30)
    fig = plot_loss(losses, valid_losses=[(9, 1.6), (19, 1.1)], skip_start=10)
    train, valid = fig.axes[0].get_lines()
    np.testing.assert_array_equal(train.get_xdata(), np.arange(10, 30))
    np.testing.assert_array_equal(train.get_ydata(), losses[10:])
    np.testing.assert_array_equal(valid.get_xydata(), [[19, 1.1]])


def test_plot_loss_without_validation_draws_only_the_train_line() -> None:
    fig = plot_loss([1.0, 0.8, 0.7])
    assert len(fig.axes[0].get_lines()) == 1
    assert legend_texts(fig.axes[0]) == ["train"]


def test_plot_loss_rejects_empty_losses_and_a_skip_start_past_the_end() -> None:
    with pytest.raises(ValueError, match="losses is empty"):
        plot_loss([])
    with pytest.raises(ValueError, match="skip_start=3 leaves nothing of the 3 recorded steps"):
        plot_loss([1.0, 0.8, 0.7], skip_start=3)
    with pytest.raises(ValueError, match=r"valid_losses must be \(step, loss\) pairs"):
        plot_loss([1.0, 0.8, 0.7], valid_losses=[(1, 0.9, 0.1)])


# --------------------------------------------------------------------------------------------
# plot_lr_find
# --------------------------------------------------------------------------------------------


def test_plot_lr_find_draws_the_curve_without_skip_end_on_a_log_axis() -> None:
    lrs = np.logspace(-7, 1, 100)
    losses = (np.log10(lrs) + 3) ** 2
    fig = plot_lr_find(lrs, losses, skip_end=5)
    (ax,) = fig.axes
    (curve,) = ax.get_lines()
    np.testing.assert_array_equal(curve.get_xdata(), lrs[:95])
    np.testing.assert_array_equal(curve.get_ydata(), losses[:95])
    assert ax.get_xscale() == "log"
    assert ax.get_legend() is None

    (curve,) = plot_lr_find(lrs, losses, skip_end=0).axes[0].get_lines()
    np.testing.assert_array_equal(curve.get_xdata(), lrs)


def test_plot_lr_find_marks_each_suggestion_and_labels_it_with_its_value() -> None:
    lrs = np.logspace(-7, 1, 100)
    losses = (np.log10(lrs) + 3) ** 2
    suggestions = {"valley": (1.9e-4, 0.52), "steep": (3.0e-5, 2.3)}
    fig = plot_lr_find(lrs, losses, suggestions)
    (ax,) = fig.axes
    curve, *markers = ax.get_lines()
    assert [tuple(m.get_xydata()[0]) for m in markers] == [(1.9e-4, 0.52), (3.0e-5, 2.3)]
    assert all(m.get_marker() == "o" and m.get_linestyle() == "None" for m in markers)
    colors = {curve.get_color(), *(m.get_color() for m in markers)}
    assert len(colors) == 3
    assert legend_texts(ax) == ["valley: 1.9e-04", "steep: 3.0e-05"]


def test_plot_lr_find_leaves_out_nan_suggestions_and_draws_nan_losses_as_gaps() -> None:
    lrs = np.logspace(-7, 1, 20)
    losses = np.linspace(1.0, 0.0, 20)
    losses[[3, 8]] = [np.nan, np.inf]
    fig = plot_lr_find(lrs, losses, {"valley": (np.nan, np.nan), "steep": (1e-5, 0.5)}, 0)
    curve, *markers = fig.axes[0].get_lines()
    assert np.isnan(curve.get_ydata()[[3, 8]]).all()
    assert len(markers) == 1
    assert legend_texts(fig.axes[0]) == ["steep: 1.0e-05"]


def test_plot_lr_find_rejects_mismatched_lengths_and_a_skip_end_that_leaves_nothing() -> None:
    with pytest.raises(ValueError, match="lrs has 3 values but losses has 2"):
        plot_lr_find([1e-3, 1e-2, 1e-1], [1.0, 0.5])
    with pytest.raises(ValueError, match="skip_end=5 leaves nothing of the 3 points"):
        plot_lr_find([1e-3, 1e-2, 1e-1], [1.0, 0.5, 0.2])


# --------------------------------------------------------------------------------------------
# No pyplot figures; show
# --------------------------------------------------------------------------------------------


def test_figures_are_not_registered_with_pyplot() -> None:
    before = plt.get_fignums()
    lrs, moms = one_cycle_like()
    figures = [
        plot_sched(lrs, moms, ["a", "b", "c"], boundaries=[10]),
        plot_loss(np.linspace(2.0, 1.0, 10), [(9, 1.2)]),
        plot_lr_find(np.logspace(-7, 1, 20), np.linspace(2.0, 1.0, 20), {"valley": (1e-5, 1.5)}),
    ]
    assert plt.get_fignums() == before
    for fig in figures:
        fig.savefig(io.BytesIO(), format="png")  # drawing does not register them either
    assert plt.get_fignums() == before


class DisplaySpy:
    """A fake ``IPython.display`` module that records what is displayed."""

    def __init__(self) -> None:
        self.displayed: list[Any] = []
        self.module = types.ModuleType("IPython.display")
        self.module.display = lambda obj, **options: self.displayed.append(obj)
        self.module.Image = types.SimpleNamespace  # Image(data=..., format=...) keeps its args


def install_fake_ipython(monkeypatch: pytest.MonkeyPatch, shell: Any) -> DisplaySpy:
    spy = DisplaySpy()
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell
    ipython.version_info = (8, 24, 0)  # matplotlib reads it when it draws under IPython
    ipython.display = spy.module
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", spy.module)
    return spy


def small_figure() -> Figure:
    return plot_loss([1.0, 0.8, 0.7])


def test_show_in_a_plain_script_displays_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = install_fake_ipython(monkeypatch, shell=None)  # IPython importable, no shell running
    assert show(small_figure()) is None
    assert spy.displayed == []


def test_show_without_ipython_installed_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "IPython", None)  # makes `import IPython` fail
    assert show(small_figure()) is None


def test_show_in_a_terminal_ipython_displays_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = install_fake_ipython(monkeypatch, shell=types.SimpleNamespace())  # no .kernel
    show(small_figure())
    assert spy.displayed == []


def test_show_in_a_kernel_with_a_figure_formatter_displays_the_figure_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class PngFormatter:
        enabled = True

        def lookup_by_type(self, kind: type) -> object:
            if issubclass(kind, Figure):
                return lambda fig: b"png of " + repr(fig).encode()
            raise KeyError(kind)

    formatters = {"text/plain": PngFormatter(), "image/png": PngFormatter()}
    shell = types.SimpleNamespace(
        kernel=object(), display_formatter=types.SimpleNamespace(formatters=formatters)
    )
    fig = small_figure()  # made before the kernel: not shown yet
    spy = install_fake_ipython(monkeypatch, shell)
    show(fig)
    # The kernel's own formatter renders it (the user's format and dpi), once.
    assert spy.displayed == [
        {"text/plain": repr(fig), "image/png": b"png of " + repr(fig).encode()}
    ]


def test_show_in_a_kernel_without_a_figure_formatter_displays_a_png_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NoFigureFormatter:
        enabled = True

        def lookup_by_type(self, kind: type) -> object:
            raise KeyError(kind)

    formatters = {"image/png": NoFigureFormatter()}
    shell = types.SimpleNamespace(
        kernel=object(), display_formatter=types.SimpleNamespace(formatters=formatters)
    )
    fig = small_figure()
    spy = install_fake_ipython(monkeypatch, shell)
    show(fig)
    (image,) = spy.displayed
    assert image.format == "png"
    assert image.data.startswith(b"\x89PNG")


@pytest.mark.slow
def test_show_in_a_real_jupyter_kernel_outputs_one_image_per_call(tmp_path: Any) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    root = str(pathlib.Path(__file__).resolve().parents[1])
    cells = [
        # Before pyplot is used the inline backend has no figure formatter: PNG fallback.
        f"import sys; sys.path.insert(0, {root!r})\n"
        "from difflr.plotting import plot_loss, show\n"
        "show(plot_loss([3.0, 2.0, 1.0]))",
        # After it, the figure itself is displayed; pyplot's end-of-cell flush adds nothing.
        "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()",
        "show(plot_loss([3.0, 2.0, 1.0]))",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(
        notebook, timeout=120, resources={"metadata": {"path": tmp_path}}
    ).execute()
    for cell in (notebook.cells[0], notebook.cells[2]):
        images = [out for out in cell.outputs if "image/png" in out.get("data", {})]
        assert len(images) == 1


def test_plot_sched_leaves_zero_lrs_out_and_draws_frozen_stretches_faint() -> None:
    # The original milestone plan: group 0 frozen at LR 0 for two steps, then trained.
    lrs = [[0.0, 1e-3], [0.0, 1e-3], [1e-5, 1e-4], [1e-5, 1e-4]]
    fig = plot_sched(
        lrs, names=["stem", "head"], boundaries=[2], trainable=[[False, True], [True, True]]
    )
    stem, head = (line for line in fig.axes[0].get_lines() if line.get_label() in ("stem", "head"))
    assert np.isnan(stem.get_ydata()[:2]).all()  # not at the axis floor
    np.testing.assert_allclose(stem.get_ydata()[2:], [1e-5, 1e-5])
    np.testing.assert_allclose(head.get_ydata(), [1e-3, 1e-3, 1e-4, 1e-4])
    frozen = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    assert len(frozen) == 1 and np.isnan(frozen[0].get_ydata()).all()  # LR 0: nothing to draw


def test_plot_sched_draws_a_frozen_group_with_an_lr_dotted() -> None:
    fig = plot_sched([[1e-4, 1e-3]] * 3, names=["stem", "head"], trainable=[[False, True]])
    dotted = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1
    np.testing.assert_allclose(dotted[0].get_ydata(), [1e-4] * 3)
    stem = next(line for line in fig.axes[0].get_lines() if line.get_label() == "stem")
    assert np.isnan(stem.get_ydata()).all()


PLOT_CELLS = [
    # (cell, figures it shows)
    ("learn.recorder.plot_loss(); learn.recorder.plot_sched()", 2),  # neither is the value
    ("learn.recorder.plot_sched()", 1),  # the cell's value: shown where called, not again
    ("fig = learn.recorder.plot_sched()", 1),
    ("fig", 1),  # a later cell asks for it again
    ("import matplotlib.pyplot as plt\nlearn.recorder.plot_sched()", 1),  # inline backend on
    ("print(learn.summary())\nlearn.recorder.plot_sched()\nprint('after')", 1),
    ("learn.preview_one_cycle(2).plot_sched()", 1),
]


def test_in_a_kernel_every_plot_shows_where_it_is_called_exactly_once(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient runs kernels ([dev] extra)")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    setup = (
        "import torch.nn.functional as F\n"
        "from difflr import Learner\n"
        "from tests.helpers import make_loaders, make_model, three_groups\n"
        "learn = Learner(make_model(), make_loaders(64, 8), loss_func=F.cross_entropy,\n"
        "                splitter=three_groups, logger=False, checkpoint=False,\n"
        "                enable_progress_bar=False)\n"
        "learn.fit_one_cycle(1)\n"
    )
    cells = [setup] + [cell for cell, _ in PLOT_CELLS]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    for cell, (source, expected) in zip(notebook.cells[1:], PLOT_CELLS):
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == expected, source
        assert all(o["output_type"] == "display_data" for o in images), source


def test_figures_fit_a_page_column_so_their_text_is_not_shrunk() -> None:
    lrs, moms = one_cycle_like()
    figures = [
        plot_sched(lrs, moms, ["a", "b", "c"], boundaries=[10]),  # two panels: stacked
        plot_loss(np.linspace(2.0, 1.0, 10)),
        plot_lr_find(np.logspace(-7, 1, 20), np.linspace(2.0, 1.0, 20), {"valley": (1e-5, 1.5)}),
    ]
    for fig in figures:
        width, _ = fig.get_size_inches() * fig.dpi
        assert width <= 720  # a docs page's column is ~700 px: shown at full size
        for ax in fig.axes:
            assert ax.xaxis.get_ticklabels()[0].get_fontsize() >= 8
    lr_ax, mom_ax = figures[0].axes
    assert lr_ax.get_position().y0 > mom_ax.get_position().y1  # LR above momentum
