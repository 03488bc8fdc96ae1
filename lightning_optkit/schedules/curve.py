"""The resolved, closed-form multiplier of a schedule: a pickleable function of the step count alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Curve:
    """Multiplier of each group's base lr at optimizer step ``t`` (0 = the first step).

    Time runs in ticks of ``tick`` optimizer steps (1, or the steps per epoch for ``interval="epoch"``):
    a linear warmup from ``start_factor`` to 1 over ``warmup`` ticks, then ``floor + (1 - floor) *
    shape(tick - warmup, total - warmup)``, held at its ``total`` value afterwards.
    """

    shape: Callable[[int, int | None], float]
    warmup: int
    total: int | None
    start_factor: float
    floor: float
    tick: int = 1

    def __call__(self, step: int) -> float:
        k = step // self.tick
        if k < self.warmup:
            return self.start_factor + (1.0 - self.start_factor) * k / self.warmup
        if self.total is not None:
            k = min(k, self.total)
        decay_steps = None if self.total is None else self.total - self.warmup
        return self.floor + (1.0 - self.floor) * self.shape(k - self.warmup, decay_steps)

    def warmup_end_step(self) -> int:
        """The first optimizer step at full lr (0 without warmup)."""
        return self.warmup * self.tick
