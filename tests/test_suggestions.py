"""Suggestion functions on closed-form curves, and make_suggestions / SuggestedLRs."""

from __future__ import annotations

import copy
import functools
import math
import pickle

import numpy as np
import pytest

from difflr.policy.suggestions import (
    SuggestedLRs,
    make_suggestions,
    minimum,
    slide,
    steep,
    suggestion_name,
    valley,
)

SUGGESTION_FUNCS = (valley, slide, minimum, steep)


def log_grid(n: int, start: float = -7.0, step: float = 0.1) -> np.ndarray:
    """``n`` LRs spaced ``step`` decades apart from ``10**start``."""
    return 10.0 ** (start + step * np.arange(n))


# --------------------------------------------------------------------------------------------
# valley
# --------------------------------------------------------------------------------------------


def test_valley_on_a_curve_falling_from_the_first_point() -> None:
    lrs = log_grid(10)
    losses = np.linspace(2.0, 1.0, 10)
    # Longest decrease: all 10 points, end = 9, so fastai's start = 9 - 10 = -1;
    # sections = (9 - -1) / 3 = 3.33 -> index = -1 + int(3.33) + int(1.67) = -1 + 3 + 1 = 3.
    assert valley(lrs, losses) == lrs[3]


def test_valley_on_a_curve_that_rises_then_falls_then_rises() -> None:
    lrs = log_grid(13)
    losses = [1, 2, 3, 10, 9, 8, 7, 6, 5, 4, 5, 6, 7]
    # Longest decrease: 10, 9, ..., 4 at indices 3..9 (7 points), so end = 9, start = 9 - 7 = 2;
    # sections = 7 / 3 = 2.33 -> index = 2 + int(2.33) + int(1.17) = 2 + 2 + 1 = 5.
    assert valley(lrs, losses) == lrs[5]


def test_valley_follows_a_decreasing_subsequence_across_a_bump() -> None:
    lrs = log_grid(5)
    losses = [5.0, 4.0, 6.0, 3.0, 2.0]
    # fastai's DP finds the subsequence 5, 4, 3, 2 (skipping the 6), not the contiguous run
    # 6, 3, 2: end = 4, length 4, start = 0; sections = 4 / 3 -> index = 0 + 1 + 0 = 1.
    assert valley(lrs, losses) == lrs[1]


def test_valley_keeps_the_first_of_two_equally_long_valleys() -> None:
    lrs = log_grid(14)
    losses = [0, 9, 8, 7, 6, 5, 4, 0, 9, 8, 7, 6, 5, 4]
    # Both valleys have 6 points; the first ends at 6: start = 0, sections = 2 -> index 3.
    # (The second would give start = 7, index 10.)
    assert valley(lrs, losses) == lrs[3]


def test_valley_does_not_wrap_round_on_a_two_point_valley() -> None:
    lrs = [1e-4, 1e-3]
    # fastai: end = 1, start = 1 - 2 = -1, index = -1 + 0 + 0 = -1, i.e. the *last* LR.
    assert valley(lrs, [1.0, 0.5]) == 1e-4


# --------------------------------------------------------------------------------------------
# slide
# --------------------------------------------------------------------------------------------


def test_slide_stops_at_once_on_a_straight_line() -> None:
    lrs = log_grid(30)
    losses = np.linspace(3.0, 0.1, 30)
    # The gradient is the same everywhere, so the first window (right = 29, left = 14) stops.
    assert slide(lrs, losses) == lrs[29 - 15]


def line_then_parabola() -> np.ndarray:
    """40 losses: a straight line down (-0.1 per point) to 0 at index 25, then 0.05 * (i - 25)**2.

    Its gradient (np.gradient) is -0.1 up to index 24, -0.025 at 25, then 0.1 * (i - 25).
    """
    i = np.arange(40)
    return np.where(i <= 25, 0.1 * (25 - i), 0.05 * (i - 25) ** 2)


def test_slide_finds_where_the_gradient_stops_changing() -> None:
    lrs = log_grid(40)
    # The window (15 points wide) slides left from (24, 39) while the two gradients differ by
    # more than 0.005; the first window with both ends on the line is (9, 24). fastai returns
    # the left end of the previous window, index 10.
    assert slide(lrs, line_then_parabola()) == lrs[10]


def test_slide_scales_its_result_by_adjust_value() -> None:
    lrs = log_grid(40)
    assert slide(lrs, line_then_parabola(), adjust_value=0.5) == pytest.approx(0.5 * lrs[10])


def test_slide_window_width_is_lr_diff() -> None:
    lrs = log_grid(40)
    # A window 5 points wide first has both ends on the line at (19, 24): index 20.
    assert slide(lrs, line_then_parabola(), lr_diff=5) == lrs[20]


def test_slide_on_a_curve_shorter_than_the_window_gives_the_first_lr() -> None:
    lrs = log_grid(6)
    losses = [1.0, 0.9, 0.8, 0.7, 2.0, 5.0]
    assert slide(lrs, losses, lr_diff=15, adjust_value=2.0) == pytest.approx(2.0 * lrs[0])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"lr_diff": 0}, ValueError, r"lr_diff must be an int >= 1 \(points\), got 0"),
        ({"lr_diff": 2.5}, TypeError, r"lr_diff must be an int \(points\), got 2.5"),
        ({"thresh": -1.0}, ValueError, r"thresh must be a finite number >= 0, got -1.0"),
        ({"adjust_value": 0.0}, ValueError, r"adjust_value must be a finite number > 0, got 0.0"),
    ],
)
def test_slide_rejects_parameters_out_of_range(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        slide(log_grid(20), np.linspace(1, 0, 20), **kwargs)


# --------------------------------------------------------------------------------------------
# minimum, steep
# --------------------------------------------------------------------------------------------


def test_minimum_is_a_tenth_of_the_lr_at_the_bottom_of_a_parabola() -> None:
    lrs = log_grid(61, start=-6.0)  # 1e-6 ... 1, 0.1 decade apart
    losses = (np.log10(lrs) + 2.5) ** 2  # lowest at lr = 10**-2.5, index 35
    assert minimum(lrs, losses) == pytest.approx(10**-3.5)


def test_minimum_takes_the_first_of_equal_minima() -> None:
    lrs = log_grid(5)
    assert minimum(lrs, [3.0, 1.0, 2.0, 1.0, 4.0]) == pytest.approx(lrs[1] / 10)


def test_steep_is_the_left_end_of_the_steepest_segment() -> None:
    lrs = log_grid(6)
    # Drops per segment: 0.1, 0.1, 0.6, 0.1, 0.1 -> the steepest starts at index 2.
    assert steep(lrs, [2.0, 1.9, 1.8, 1.2, 1.1, 1.0]) == lrs[2]


def test_steep_on_a_tanh_step_centred_between_two_points() -> None:
    lrs = log_grid(61, start=-6.0)
    # Steepest at log10(lr) = -3.05, the middle of the segment from 10**-3.1 to 10**-3.0.
    losses = 1.0 - np.tanh(3.0 * (np.log10(lrs) + 3.05))
    assert steep(lrs, losses) == pytest.approx(10**-3.1)


def test_steep_measures_the_slope_against_log_lr() -> None:
    lrs = [1e-4, 1e-3, 1.1e-3, 1e-2]
    losses = [3.0, 2.0, 1.95, 1.0]
    # Slope per decade: -1.0, -0.05 / log10(1.1) = -1.21, -0.99: the middle segment.
    # (Per unit of LR the first segment would be the steepest.)
    assert steep(lrs, losses) == 1e-3


# --------------------------------------------------------------------------------------------
# Behaviour shared by the four functions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("func", SUGGESTION_FUNCS)
@pytest.mark.parametrize(
    "losses", [[1.0, 1.2, 1.5, 2.0, 3.0, 5.0], [1.0] * 6], ids=["rising", "flat"]
)
def test_a_curve_that_never_decreases_gives_the_first_lr(func, losses: list[float]) -> None:
    lrs = log_grid(6)
    assert func(lrs, losses) == lrs[0]


@pytest.mark.parametrize("func", SUGGESTION_FUNCS)
def test_non_finite_losses_are_dropped(func) -> None:
    lrs = log_grid(40)
    losses = line_then_parabola()
    dirty = losses.copy()
    dirty[[3, 17, 30]] = [np.nan, np.inf, -np.inf]
    keep = np.isfinite(dirty)
    assert func(lrs, dirty) == func(lrs[keep], losses[keep])


@pytest.mark.parametrize("func", SUGGESTION_FUNCS)
def test_returns_a_python_float_from_lists_and_float32_arrays(func) -> None:
    lrs = log_grid(40)  # 1e-7 ... 10**-3.1
    losses = 2.0 - np.tanh(2.0 * (np.log10(lrs) + 5.05)) + 0.1 * np.arange(40) ** 2 / 40
    from_list = func(lrs.tolist(), losses.tolist())
    from_float32 = func(lrs.astype(np.float32), losses.astype(np.float32))
    assert type(from_list) is float
    assert type(from_float32) is float
    assert from_float32 == pytest.approx(from_list, rel=1e-6)


@pytest.mark.parametrize("func", SUGGESTION_FUNCS)
def test_lengths_that_differ_are_named_in_the_error(func) -> None:
    with pytest.raises(ValueError, match="lrs has 3 values but losses has 2"):
        func([1e-3, 1e-2, 1e-1], [1.0, 0.5])


@pytest.mark.parametrize("func", SUGGESTION_FUNCS)
def test_fewer_than_two_finite_points_is_an_error(func) -> None:
    with pytest.raises(
        ValueError, match=r"at least 2 points with a finite loss; got 1 \(lrs has 3"
    ):
        func([1e-3, 1e-2, 1e-1], [np.nan, 0.5, np.inf])
    with pytest.raises(ValueError, match=r"got 1 \(lrs has 1 values, losses has 1\)"):
        func([1e-3], [1.0])
    with pytest.raises(ValueError, match=r"got 0 \(lrs has 0 values"):
        func([], [])


@pytest.mark.parametrize("func", SUGGESTION_FUNCS)
def test_lrs_must_be_positive_and_strictly_increasing(func) -> None:
    with pytest.raises(ValueError, match=r"finite and > 0 .*got lrs\[1\] = 0.0"):
        func([1e-3, 0.0, 1e-1], [1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match=r"strictly increasing.*lrs\[2\] = 0.01 after lrs\[1\]"):
        func([1e-3, 1e-2, 1e-2], [1.0, 0.5, 0.2])


def test_two_dimensional_and_non_numeric_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"lrs must be 1-D .*got shape \(2, 2\)"):
        valley([[1e-3, 1e-2], [1e-3, 1e-2]], [1.0, 0.5])
    with pytest.raises(TypeError, match="losses must be a sequence of numbers"):
        valley([1e-3, 1e-2], ["a", "b"])


# --------------------------------------------------------------------------------------------
# make_suggestions and SuggestedLRs
# --------------------------------------------------------------------------------------------


def parabola_sweep(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """A sweep of ``n`` LRs from 1e-7, 0.08 decade apart, with the lowest loss at index 60."""
    lrs = log_grid(n, step=0.08)
    return lrs, (np.log10(lrs) - np.log10(lrs[60])) ** 2


def test_fields_are_named_after_the_functions() -> None:
    lrs, losses = parabola_sweep()
    suggested, points = make_suggestions((valley,), lrs, losses, skip_start=10)
    assert isinstance(suggested, SuggestedLRs)
    assert suggested._fields == ("valley",)
    assert suggested.valley == valley(lrs[10:95], losses[10:95])
    assert list(points) == ["valley"]

    suggested, points = make_suggestions((valley, steep), lrs, losses, skip_start=10)
    assert suggested._fields == ("valley", "steep")
    assert suggested.steep == steep(lrs[10:95], losses[10:95])
    assert list(points) == ["valley", "steep"]


def test_a_single_function_need_not_be_in_a_tuple() -> None:
    lrs, losses = parabola_sweep()
    suggested, _ = make_suggestions(minimum, lrs, losses)
    assert suggested.minimum == pytest.approx(lrs[60] / 10)


def test_user_functions_lambdas_partials_and_repeated_names_get_fields() -> None:
    lrs, losses = parabola_sweep()

    def my_rule(lrs: np.ndarray, losses: np.ndarray) -> float:
        return float(lrs[0])

    funcs = (
        my_rule,
        lambda lrs, losses: 1e-3,
        functools.partial(slide, lr_diff=10),
        functools.partial(slide, lr_diff=20),
    )
    suggested, _ = make_suggestions(funcs, lrs, losses, skip_start=10)
    assert suggested._fields == ("my_rule", "func1", "slide", "slide_3")
    assert suggested.my_rule == lrs[10]
    assert suggested.func1 == 1e-3
    assert suggested.slide == slide(lrs[10:95], losses[10:95], lr_diff=10)
    assert suggested.slide_3 == slide(lrs[10:95], losses[10:95], lr_diff=20)


def test_suggestion_name_of_callables_without_a_usable_name() -> None:
    class Rule:
        def __call__(self, lrs: np.ndarray, losses: np.ndarray) -> float:
            return 1e-3

    assert suggestion_name(valley) == "valley"
    assert suggestion_name(lambda lrs, losses: 1.0, 4) == "func4"
    assert suggestion_name(Rule(), 1) == "func1"


def test_functions_see_the_curve_without_skipped_and_non_finite_points() -> None:
    lrs = log_grid(20)
    losses = np.linspace(2.0, 1.0, 20)
    losses[[1, 7, 18]] = [np.nan, np.inf, np.nan]
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def spy(lrs: np.ndarray, losses: np.ndarray) -> float:
        seen.append((lrs, losses))
        return float(lrs[0])

    make_suggestions(spy, lrs, losses, skip_start=2, skip_end=5)
    kept = [2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14]  # 2..14 without the inf at 7
    np.testing.assert_array_equal(seen[0][0], lrs[kept])
    np.testing.assert_array_equal(seen[0][1], losses[kept])

    make_suggestions(spy, lrs, losses, skip_start=0, skip_end=0)
    assert len(seen[1][0]) == 17  # all 20 but the 3 non-finite


def test_too_few_points_left_warns_and_gives_nan() -> None:
    lrs = log_grid(12)
    losses = np.linspace(2.0, 1.0, 12)
    with pytest.warns(UserWarning, match=r"12 points; 1 remain .* first 6 and the last 5") as rec:
        suggested, points = make_suggestions((valley, steep), lrs, losses, skip_start=6)
    assert rec[0].filename == __file__  # stacklevel=2 points at the caller
    assert suggested._fields == ("valley", "steep")
    assert all(math.isnan(value) for value in suggested)
    assert all(math.isnan(lr) and math.isnan(loss) for lr, loss in points.values())


def test_points_hold_the_loss_at_each_suggestion() -> None:
    lrs, losses = parabola_sweep()
    suggested, points = make_suggestions((valley, minimum), lrs, losses, skip_start=10)
    # valley lands on a point of the curve: its own loss.
    index = int(np.flatnonzero(lrs == suggested.valley)[0])
    assert points["valley"] == (suggested.valley, pytest.approx(losses[index]))
    # minimum: lrs[60] / 10 is one decade = 12.5 points left of the bottom, halfway between
    # points 47 and 48, whose losses are 1.04**2 = 1.0816 and 0.96**2 = 0.9216: the linear
    # interpolation gives their mean, 1.0016.
    assert points["minimum"] == (pytest.approx(lrs[60] / 10), pytest.approx(1.0016))


def test_points_outside_the_curve_take_the_end_loss_and_nan_lrs_give_nan() -> None:
    lrs, losses = parabola_sweep()
    funcs = (lambda lrs, losses: 1e-12, lambda lrs, losses: math.nan)
    _, points = make_suggestions(funcs, lrs, losses, skip_end=5)
    assert points["func0"] == (1e-12, losses[0])
    assert math.isnan(points["func1"][1])


def test_points_are_read_on_the_curve_without_skip_end() -> None:
    lrs = log_grid(10)
    losses = np.arange(10.0)
    _, points = make_suggestions(lambda lrs, losses: 1.0, lrs, losses, skip_end=3)
    # 1.0 lies beyond lrs[6], the last plotted point, so the loss is losses[6].
    assert points["func0"] == (1.0, 6.0)


def test_make_suggestions_rejects_bad_arguments() -> None:
    lrs, losses = parabola_sweep()
    with pytest.raises(ValueError, match=r"suggest_funcs is empty; pass at least one"):
        make_suggestions((), lrs, losses)
    with pytest.raises(TypeError, match=r"must be callable as func\(lrs, losses\); got 'valley'"):
        make_suggestions(("valley",), lrs, losses)
    with pytest.raises(ValueError, match=r"skip_start must be an int >= 0 \(points\), got -1"):
        make_suggestions(valley, lrs, losses, skip_start=-1)
    with pytest.raises(ValueError, match="lrs has 100 values but losses has 99"):
        make_suggestions(valley, lrs, losses[:-1])
    with pytest.raises(TypeError, match=r"'func0' must return a learning rate as a number"):
        make_suggestions(lambda lrs, losses: "big", lrs, losses)


def test_suggested_lrs_behaves_as_a_namedtuple_of_its_fields() -> None:
    suggested = SuggestedLRs.from_dict({"valley": 1e-3, "steep": 3e-3})
    assert suggested == (1e-3, 3e-3)
    assert (suggested.valley, suggested.steep) == (1e-3, 3e-3)
    assert repr(suggested) == "SuggestedLRs(valley=0.001, steep=0.003)"
    assert suggested._asdict() == {"valley": 1e-3, "steep": 3e-3}
    assert type(SuggestedLRs.from_dict({"valley": 1.0, "steep": 2.0})) is type(suggested)


def test_suggested_lrs_survives_pickle_and_copy() -> None:
    suggested = SuggestedLRs.from_dict({"valley": 1e-3, "func0": 2e-3})
    for clone in (pickle.loads(pickle.dumps(suggested)), copy.deepcopy(suggested)):
        assert clone == suggested
        assert clone._fields == ("valley", "func0")
        assert isinstance(clone, SuggestedLRs)


@pytest.mark.parametrize("name", ["<lambda>", "class", "_private", ""])
def test_suggested_lrs_rejects_names_that_cannot_be_fields(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name!r} cannot be a SuggestedLRs field"):
        SuggestedLRs.from_dict({"valley": 1.0, name: 1.0})
