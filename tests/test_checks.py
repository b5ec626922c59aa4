"""The argument checks every entry point uses: TypeError for a wrong type, ValueError for a bad
value, and a message that names the value and the fix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from difflr.utils.checks import (
    check_choice,
    check_int,
    check_moms,
    check_number,
    check_pct,
    check_wd,
)


def test_check_int_accepts_numpy_ints_and_returns_a_python_int():
    value = check_int(np.int64(3), "n", 1)
    assert value == 3 and type(value) is int


@pytest.mark.parametrize("value", [1.0, "1", True, None])
def test_check_int_refuses_other_types_with_a_type_error(value):
    with pytest.raises(TypeError, match=r"n_epoch must be an int \(a number of epochs\), got"):
        check_int(value, "n_epoch", 1, what="a number of epochs")


def test_check_int_refuses_a_value_below_its_floor():
    with pytest.raises(ValueError, match=r"num_it must be an int >= 2, got 1\."):
        check_int(1, "num_it", 2)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: check_number(math.nan, "div", 0), r"div must be a finite number > 0, got nan"),
        (lambda: check_number(math.inf, "div", 0), r"div must be a finite number > 0, got inf"),
        (lambda: check_number(-1, "wd", 0, open_low=False), r"wd must be a finite number >= 0"),
        (lambda: check_number(1, "p", 0, 1, open_high=False), None),
        (lambda: check_number(2, "p", 0, 1, open_low=False), r"p must be in \[0, 1\), got 2"),
        (lambda: check_pct(0.0), r"pct_start must be in \(0, 1\) \(the fraction.*e\.g\. pct_start"),
        (lambda: check_wd(-0.5), r"wd must be a finite number >= 0 \(weight decay\)"),
        (lambda: check_moms((0.9, 1.0, 0.9)), r"moms must be three values .* in \[0, 1\)"),
        (lambda: check_choice("ram", "snapshot", ("memory", "disk")), "'memory' or 'disk'"),
    ],
)
def test_bad_values_raise_value_errors_that_name_the_value(call, words):
    if words is None:
        assert call() == 1.0
        return
    with pytest.raises(ValueError, match=words):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: check_number("0.1", "lr", 0),
        lambda: check_number(True, "lr", 0),
        lambda: check_moms(0.9),
        lambda: check_moms(("a", "b", "c")),
        lambda: check_wd("1e-2"),
    ],
)
def test_wrong_types_raise_type_errors(call):
    with pytest.raises(TypeError):
        call()


def test_checks_return_the_normal_form():
    assert check_moms([0.95, 0.85, 0.95]) == (0.95, 0.85, 0.95)
    assert check_wd(None) is None and check_wd(0) == 0.0
    assert check_pct(np.float32(0.5)) == 0.5
