"""Unique display labels: one rule for the plan's optimizer names and the callbacks' metric keys."""

from __future__ import annotations

from collections.abc import Sequence


def unique_labels(bases: Sequence[str]) -> list[str]:
    """``bases`` with repeats made unique by ``-1``, ``-2``... (``Adam``, ``Adam-1``), as Lightning's
    LearningRateMonitor names several optimizers of one class."""
    out: list[str] = []
    used: set[str] = set()
    for base in bases:
        label, n = base, 0
        while label in used:
            n += 1
            label = f"{base}-{n}"
        used.add(label)
        out.append(label)
    return out
