import doctest
import math

import numpy as np
import pytest

import difflr.policy.lr
from difflr import LayerDecay, Stage, expand_lrs, layer_decay


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


# --------------------------------------------------------------------------------------------
# layer_decay: timm's layer-wise LR decay, the same spec as a slice
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_groups", [1, 2, 6, 14])
@pytest.mark.parametrize("decay", [0.5, 0.75, 1.0])
def test_layer_decay_is_hi_times_decay_per_group_towards_the_stem(n_groups, decay):
    lrs = expand_lrs(layer_decay(1e-3, decay), n_groups)
    assert lrs == pytest.approx([1e-3 * decay ** (n_groups - 1 - i) for i in range(n_groups)])
    assert lrs[-1] == 1e-3


@pytest.mark.parametrize("n_groups", [1, 2, 6, 14])
@pytest.mark.parametrize("decay", [0.5, 0.75, 1.0])
def test_layer_decay_equals_the_matching_slice(n_groups, decay):
    spec = layer_decay(2e-3, decay)
    as_slice = spec.as_slice(n_groups)
    assert as_slice == slice(2e-3 * decay ** (n_groups - 1), 2e-3)
    assert expand_lrs(spec, n_groups) == pytest.approx(expand_lrs(as_slice, n_groups), rel=1e-12)


def test_layer_decay_matches_timms_per_layer_scales():
    # timm's param_groups_layer_decay: layer i of num_layers + 1 gets decay ** (num_layers - i).
    num_layers, decay = 12, 0.65
    scales = [decay ** (num_layers - i) for i in range(num_layers + 1)]
    lrs = expand_lrs(layer_decay(1.0, decay), num_layers + 1)
    assert lrs == pytest.approx(scales)


def test_layer_decay_works_wherever_a_spec_does():
    spec = layer_decay(1e-2, 0.5)
    assert Stage(0, 1, spec).lrs(3) == pytest.approx([2.5e-3, 5e-3, 1e-2])
    assert repr(spec) == "layer_decay(0.01, 0.5)"
    assert isinstance(spec, LayerDecay) and spec == layer_decay(1e-2, 0.5)


@pytest.mark.parametrize(
    ("hi", "decay", "exc", "words"),
    [
        (0, 0.5, ValueError, r"hi must be a finite number > 0 \(the head's LR\), got 0"),
        (1e-3, 0, ValueError, r"decay must be in \(0, 1\] .*got 0; e\.g\. decay=0\.75"),
        (1e-3, 1.5, ValueError, r"decay must be in \(0, 1\]"),
        (1e-3, float("nan"), ValueError, "decay must be"),
        ("1e-3", 0.5, TypeError, "hi must be a number"),
        (1e-3, None, TypeError, "decay must be a number"),
    ],
)
def test_bad_layer_decay_arguments_name_the_value_and_the_fix(hi, decay, exc, words):
    with pytest.raises(exc, match=words):
        layer_decay(hi, decay)


def test_the_docstring_examples_run() -> None:
    results = doctest.testmod(difflr.policy.lr)
    assert results.attempted > 0 and results.failed == 0
