"""The one exception type for an invalid spec, and helpers that make its messages actionable."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

_MAX_SHOWN = 200  # longer reprs of a bad value are shortened in the message (the value itself is kept)


class SpecError(ValueError):
    """An invalid optimizer, group or schedule spec, raised before training starts.

    The message names the field, the bad value and the fix.
    """

    def __init__(self, field: str, value: object, fix: str, *, problem: str | None = None) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        self.problem = problem
        what = problem or "is invalid"
        shown = repr(value)
        if len(shown) > _MAX_SHOWN:  # e.g. a 400-digit integer: show its ends
            shown = f"{shown[:_MAX_SHOWN // 2]}...{shown[-20:]} ({len(shown)} characters)"
        super().__init__(f"{field}={shown} {what}. Fix: {fix}")


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The names in `choices` closest to `word` (for 'did you mean' hints)."""
    pool = sorted(set(choices))
    lowered = {c.lower(): c for c in pool}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]
