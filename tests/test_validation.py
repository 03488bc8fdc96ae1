"""The shared number/flag checks: what they accept, what they return, and the messages they raise."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_optkit.durations import fraction_to_count, resolve_duration
from lightning_optkit.errors import SpecError
from lightning_optkit.schedules import Schedule
from lightning_optkit.validation import flag, number, numbers


@pytest.mark.parametrize(("value", "kwargs", "expected"), [
    ("1e-3", {}, 1e-3),  # YAML 1.1 reads 1e-3 as text
    (" 2 ", {}, 2.0),
    (3, {}, 3.0),
    ("1e3", {"integer": True}, 1000),
    (4.0, {"integer": True, "at_least": 2}, 4),
    (0, {"non_negative": True}, 0.0),
    (0.5, {"positive": True, "below_one": True}, 0.5),
    (1, {"at_least": 0.0, "at_most": 1.0}, 1.0),
    (None, {"allow_none": True}, None),
])
def test_accepted_values_come_back_as_the_requested_type(value, kwargs, expected) -> None:
    got = number("x", value, **kwargs)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("value", "kwargs", "problem", "fix"), [
    (True, {}, "is not a number", "give a number, e.g. 1e-3"),
    (None, {}, "is not a number", "give a number"),
    ([1.0], {}, "is not a number", "give a number"),
    ("1e-3x", {}, "is not a number", "give a number"),
    ("3", {"strings": False}, "is a string", "not text"),
    (torch.tensor(1.0), {"positive": True}, "is a tensor", "not a tensor"),
    (math.nan, {}, "is not finite", "give a number"),
    ("inf", {}, "is not finite", "give a number"),
    (0.0, {"positive": True}, "must be positive", "give a number > 0"),
    (-1, {"non_negative": True}, "must not be negative", "give a number >= 0"),
    (2.5, {"integer": True, "at_least": 2}, "is not an integer", "give an integer >= 2"),
    (1, {"integer": True, "at_least": 2}, "is below 2", "give an integer >= 2"),
    (1.0, {"positive": True, "below_one": True}, "is not below 1", "give a number in (0, 1)"),
    (1.5, {"at_least": 0.0, "at_most": 1.0}, "is above 1", "give a number in [0, 1]"),
])
def test_rejected_values_name_field_value_problem_and_fix(value, kwargs, problem, fix) -> None:
    with pytest.raises(SpecError) as info:
        number("opt.eps", value, **kwargs)
    message = str(info.value)
    assert info.value.field == "opt.eps" and info.value.value is value
    assert message.startswith(f"opt.eps={value!r} {problem}. Fix: ") and fix in message


def test_a_given_fix_replaces_the_generated_one() -> None:
    with pytest.raises(SpecError, match=r"Fix: pass a decay in \(0, 1\)$"):
        number("alpha", 2.0, positive=True, below_one=True, fix="pass a decay in (0, 1)")


def test_flag_accepts_only_bools() -> None:
    assert flag("f", False) is False
    for bad in (0, 1, "yes", None):
        with pytest.raises(SpecError, match="is not a bool. Fix: pass True or False"):
            flag("f", bad)


def test_flag_may_allow_none() -> None:
    assert flag("foreach", None, allow_none=True) is None
    with pytest.raises(SpecError, match="Fix: pass True or False or None"):
        flag("foreach", 1, allow_none=True)


def test_numbers_checks_the_length_and_names_the_bad_item() -> None:
    assert numbers("betas", [0.9, "0.95"], 2, non_negative=True, below_one=True) == (0.9, 0.95)
    with pytest.raises(SpecError, match=r"^betas=0.9 is not 2 numbers"):
        numbers("betas", 0.9, 2)
    with pytest.raises(SpecError) as info:
        numbers("betas", (0.9, 1.0), 2, non_negative=True, below_one=True)
    assert info.value.field == "betas[1]" and "give a number in [0, 1)" in str(info.value)


def test_fractions_round_half_up_in_durations_and_schedules_alike() -> None:
    assert [fraction_to_count(f, 10) for f in (0.04, 0.05, 0.15, 0.25)] == [0, 1, 2, 3]
    assert resolve_duration("25%", total_steps=10, steps_per_epoch=None, field="w") == 3
    curve = Schedule("linear", warmup=0.25, interval="epoch").curve(total_steps=40, steps_per_epoch=4)
    assert curve.warmup == 3  # 25% of 10 epochs, rounded half up like resolve_duration
