"""Duration strings and their resolution to optimizer steps."""

from __future__ import annotations

import pytest

from lightning_optkit.durations import resolve_duration
from lightning_optkit.errors import SpecError


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (300, 300), ("500steps", 500), ("1step", 1), ("2ep", 40), ("3 epochs", 60), ("5%", 5),
     ("12.5%", 13), (0.25, 25), ("0.1", 10), ("1e1", 10), (30.0, 30), ("100%", 100)],
)
def test_resolves_to_steps(value, expected) -> None:
    assert resolve_duration(value, total_steps=100, steps_per_epoch=20, field="f") == expected


@pytest.mark.parametrize("value", ["5 epochs?", "ten", "-3", -1, "150%", "0%", 1.0, 2.5, True, None, [3]])
def test_rejects_with_field_and_fix(value) -> None:
    with pytest.raises(SpecError) as info:
        resolve_duration(value, total_steps=100, steps_per_epoch=20, field="schedule.warmup")
    assert info.value.field == "schedule.warmup" and "Fix:" in str(info.value)


def test_fraction_of_unknown_total_and_epochs_of_unknown_length_fail_clearly() -> None:
    with pytest.raises(SpecError, match="training length is unknown"):
        resolve_duration("5%", total_steps=None, steps_per_epoch=20, field="schedule.warmup")
    with pytest.raises(SpecError, match="steps per epoch"):
        resolve_duration("2ep", total_steps=100, steps_per_epoch=None, field="schedule.warmup")
    assert resolve_duration(7, total_steps=None, steps_per_epoch=None, field="schedule.warmup") == 7
