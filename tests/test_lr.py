import math

import numpy as np
import pytest

from difflr import expand_lrs


def test_float_and_single_item_list_give_the_same_value_to_every_group():
    assert expand_lrs(1e-3, 4) == [1e-3] * 4
    assert expand_lrs([2e-3], 3) == [2e-3] * 3


def test_list_of_n_values_is_kept_as_given():
    assert expand_lrs([1e-5, 1e-4, 1e-3], 3) == [1e-5, 1e-4, 1e-3]
    assert expand_lrs(np.array([1e-5, 1e-3]), 2) == [1e-5, 1e-3]


def test_slice_hi_gives_a_tenth_to_all_but_the_last_group():
    assert expand_lrs(slice(1e-3), 4) == pytest.approx([1e-4, 1e-4, 1e-4, 1e-3])


def test_slice_lo_hi_is_geometric_from_stem_to_head():
    lrs = expand_lrs(slice(1e-6, 1e-2), 5)
    assert lrs == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    assert ratios == pytest.approx([10.0] * 4)


def test_slice_lo_hi_over_one_group_is_hi():
    assert expand_lrs(slice(1e-5, 1e-3), 1) == [1e-3]


def test_slice_with_equal_bounds_is_constant():
    assert expand_lrs(slice(1e-3, 1e-3), 3) == pytest.approx([1e-3] * 3)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (slice(0, 1e-3), "starts at 0"),
        (slice(1e-2, 1e-3), "lo > hi"),
        (-1e-3, "positive"),
        (0.0, "positive"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        ([1e-3, 1e-4], "has 2 values but the model has 3 layer groups"),
        ([1e-3, -1.0, 1e-3], r"lr\[1\] is -1.0"),
        (slice(1e-3, 1e-2, 2), "step"),
        (slice(None, None), "no upper bound"),
        (1e300, "more than a float32 parameter can be stepped by"),
        (slice(1e-5, 1e39), r"lr\.stop is 1e\+39, more than a float32"),
    ],
)
def test_bad_specs_raise_a_value_error_that_names_the_value(spec, words):
    with pytest.raises(ValueError, match=words):
        expand_lrs(spec, 3)


def test_wrong_length_message_says_the_fix():
    with pytest.raises(ValueError, match=r"pass a float, a slice\(lo, hi\) or 6 values"):
        expand_lrs([1e-3, 1e-4], 6, name="lr_max")


@pytest.mark.parametrize("spec", ["1e-3", None, {"a": 1}, [1e-3, "x", 1e-3]])
def test_non_numbers_raise_a_type_error(spec):
    with pytest.raises(TypeError, match="must be a number"):
        expand_lrs(spec, 3)


def test_zero_is_allowed_in_lists_only_when_asked():
    assert expand_lrs([0.0, 0.0, 1e-3], 3, allow_zero=True) == [0.0, 0.0, 1e-3]
    with pytest.raises(ValueError, match="positive"):
        expand_lrs([0.0, 0.0, 1e-3], 3)
