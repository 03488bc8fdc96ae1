"""The number and flag checks every part of the kit uses for user configuration.

Each check raises :class:`~lightning_optkit.errors.SpecError` naming the field, the bad value and the
fix. Bools are never numbers, NaN and inf never pass, and where ``strings=True`` a number written as
text (YAML 1.1 reads ``1e-3`` as a string) is read as the number it spells.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_optkit.errors import SpecError, closest


def number_from_text(text: str) -> float | None:
    """The float a string spells (``"1e-3"``, ``" 2 "``), or None when it is not a number."""
    try:
        return float(text.strip())
    except ValueError:
        return None


def _bounds(
    positive: bool, non_negative: bool, below_one: bool, at_least: float | None, at_most: float | None
) -> tuple[tuple[float, bool] | None, tuple[float, bool] | None]:
    """(lower, upper) bounds as (limit, inclusive), or None where unbounded."""
    lower: tuple[float, bool] | None = None
    if at_least is not None:
        lower = (at_least, True)
    if non_negative and (lower is None or lower[0] < 0):
        lower = (0.0, True)
    if positive and (lower is None or lower[0] <= 0):
        lower = (0.0, False)
    upper: tuple[float, bool] | None = None
    if at_most is not None:
        upper = (at_most, True)
    if below_one and (upper is None or upper[0] >= 1):
        upper = (1.0, False)
    return lower, upper


def _describe(integer: bool, lower: tuple[float, bool] | None, upper: tuple[float, bool] | None) -> str:
    """'a number > 0', 'an integer >= 2', 'a number in (0, 1)' ..."""
    noun = "an integer" if integer else "a number"
    if lower and upper:
        return f"{noun} in {'[' if lower[1] else '('}{lower[0]:g}, {upper[0]:g}{']' if upper[1] else ')'}"
    if lower:
        return f"{noun} {'>=' if lower[1] else '>'} {lower[0]:g}"
    if upper:
        return f"{noun} {'<=' if upper[1] else '<'} {upper[0]:g}"
    return f"{noun}, e.g. {'10' if integer else '1e-3'}"


def number(
    field: str,
    value: Any,
    *,
    positive: bool = False,
    non_negative: bool = False,
    integer: bool = False,
    below_one: bool = False,
    at_least: float | None = None,
    at_most: float | None = None,
    allow_none: bool = False,
    strings: bool = True,
    fix: str | None = None,
) -> float | int | None:
    """Validate a numeric field and return it as a float (an int where ``integer=True``).

    ``positive``: > 0; ``non_negative``: >= 0; ``below_one``: < 1; ``at_least`` / ``at_most``:
    inclusive bounds. ``integer``: a whole number (an int, or a float / string such as ``"1e3"`` that
    is whole). ``allow_none``: None passes through. ``strings``: accept numbers written as text.
    ``fix`` replaces the generated fix (e.g. to say what the number means or how to disable it).
    """
    if value is None and allow_none:
        return None
    lower, upper = _bounds(positive, non_negative, below_one, at_least, at_most)
    wanted = _describe(integer, lower, upper)

    def fail(problem: str) -> SpecError:
        return SpecError(field, value, fix or f"give {wanted}", problem=problem)

    if isinstance(value, str) and strings:
        parsed = number_from_text(value)
        if parsed is None:
            raise fail("is not a number")
    elif isinstance(value, str):
        raise SpecError(field, value, fix or f"give {wanted} as a number, not text", problem="is a string")
    elif isinstance(value, torch.Tensor):
        raise SpecError(field, value, fix or f"give a Python int or float ({wanted}), not a tensor",
                        problem="is a tensor")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail("is not a number")
    else:
        parsed = value
    if isinstance(parsed, int) and abs(parsed) > sys.float_info.max:
        raise fail("is too large (beyond the float range)")  # math and torch would raise OverflowError
    if not math.isfinite(parsed):
        raise fail("is not finite")
    if integer and not float(parsed).is_integer():
        raise fail("is not an integer")
    if lower is not None and not (parsed >= lower[0] if lower[1] else parsed > lower[0]):
        if lower[0] == 0:
            raise fail("must not be negative" if lower[1] else "must be positive")
        raise fail(f"is below {lower[0]:g}" if lower[1] else f"is not above {lower[0]:g}")
    if upper is not None and not (parsed <= upper[0] if upper[1] else parsed < upper[0]):
        raise fail(f"is above {upper[0]:g}" if upper[1] else f"is not below {upper[0]:g}")
    return int(parsed) if integer else float(parsed)


def numbers(field: str, value: Any, count: int, **checks: Any) -> tuple[float | int, ...]:
    """Validate a tuple/list of ``count`` numbers (e.g. ``betas``), each with :func:`number`'s ``checks``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != count:
        raise SpecError(field, value, f"give a list of {count} numbers", problem=f"is not {count} numbers")
    return tuple(number(f"{field}[{i}]", item, **checks) for i, item in enumerate(value))


def flag(field: str, value: Any, *, allow_none: bool = False, fix: str | None = None) -> bool | None:
    """Validate a boolean field (``0``/``1`` and ``"yes"`` are rejected, not guessed); None only if allowed."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise SpecError(field, value, fix or f"pass True or False{' or None' if allow_none else ''}",
                        problem="is not a bool")
    return value


def check_keys(field_name: str, data: Mapping[Any, Any], allowed: Sequence[str] | None = None) -> dict[str, Any]:
    """``data`` as a dict after checking that its keys are strings (YAML allows ``1:`` or ``null:`` keys) and,
    when ``allowed`` is given, among ``allowed`` (a did-you-mean otherwise)."""
    for key in data:
        if not isinstance(key, str):
            raise SpecError(f"{field_name}[{key!r}]" if field_name else repr(key), data[key],
                            "write the key as a name (YAML reads 1:, true: or null: as non-text keys)",
                            problem="has a key that is not a string")
        if allowed is not None and key not in allowed:
            near = closest(key, allowed)
            raise SpecError(f"{field_name}.{key}" if field_name else key, data[key],
                            (f"did you mean {near[0]!r}? " if near else "") + f"the keys are {', '.join(allowed)}",
                            problem="is not a known key")
    return dict(data)
