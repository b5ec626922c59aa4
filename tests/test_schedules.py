import math

import numpy as np
import pytest

from difflr.policy.schedules import (
    combine_scheds,
    exp_range,
    flat_cos_lr,
    one_cycle_lr,
    one_cycle_mom,
    sched_cos,
    sched_exp,
    sched_lin,
)


def test_basic_schedules_at_their_ends_and_middle():
    assert sched_lin(1.0, 3.0, 0.5) == 2.0
    assert sched_cos(1.0, 3.0, 0.0) == pytest.approx(1.0)
    assert sched_cos(1.0, 3.0, 0.5) == pytest.approx(2.0)
    assert sched_cos(1.0, 3.0, 1.0) == pytest.approx(3.0)
    assert sched_exp(1e-7, 10.0, 0.5) == pytest.approx(1e-7 * (1e8) ** 0.5)


@pytest.mark.parametrize("pct", [0.0, 0.1, 0.25, 0.4, 0.7, 1.0])
def test_one_cycle_lr_matches_the_closed_form(pct):
    lr_max, div, div_final, pct_start = 1e-3, 25.0, 1e5, 0.25
    sched = one_cycle_lr(lr_max, pct_start, div, div_final)
    if pct < pct_start:
        p = pct / pct_start
        expected = lr_max / div + (1 + math.cos(math.pi * (1 - p))) / 2 * (lr_max - lr_max / div)
    else:
        p = (pct - pct_start) / (1 - pct_start)
        expected = lr_max + (1 + math.cos(math.pi * (1 - p))) / 2 * (lr_max / div_final - lr_max)
    assert float(sched(pct)) == pytest.approx(expected, rel=1e-12)


def test_one_cycle_lr_broadcasts_over_groups_keeping_ratios():
    lr_max = np.array([1e-5, 1e-4, 1e-3])
    sched = one_cycle_lr(lr_max)
    for pct in np.linspace(0, 1, 11):
        values = sched(pct)
        assert values / values[-1] == pytest.approx(lr_max / lr_max[-1])


def test_one_cycle_mom_goes_down_then_up():
    sched = one_cycle_mom((0.95, 0.85, 0.95), pct_start=0.3)
    assert sched(0.0) == pytest.approx(0.95)
    assert sched(0.3) == pytest.approx(0.85)
    assert sched(1.0) == pytest.approx(0.95)


def test_flat_cos_is_flat_then_anneals():
    sched = flat_cos_lr(1e-2, pct_start=0.75, div_final=1e5)
    assert float(sched(0.0)) == pytest.approx(1e-2)
    assert float(sched(0.74)) == pytest.approx(1e-2)
    assert float(sched(1.0)) == pytest.approx(1e-7)


def test_exp_range_is_geometric_per_group():
    sched = exp_range([1e-7, 1e-6], [10.0, 100.0])
    assert sched(0.5) == pytest.approx([1e-7 * 1e4, 1e-6 * 1e4])


def test_combine_scheds_rejects_fractions_that_do_not_sum_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        combine_scheds([0.3, 0.3], [lambda p: p, lambda p: p])
    with pytest.raises(ValueError, match="one fraction per phase"):
        combine_scheds([1.0], [lambda p: p, lambda p: p])


def test_combine_scheds_clamps_pct_outside_zero_one():
    sched = combine_scheds([0.5, 0.5], [lambda p: p, lambda p: 1 + p])
    assert sched(-0.5) == 0.0
    assert sched(1.5) == 2.0
