"""Reduce-on-plateau state, and reading a monitored metric from a Trainer once per new value.

How the kit's ``plateau`` schedule runs under Lightning: it is emitted as an ordinary
``interval="step"`` scheduler (not ``reduce_on_plateau``), so Lightning steps it after every optimizer
step and the warmup advances per step even before any validation has run. (Lightning steps
``reduce_on_plateau`` schedulers only when the monitored metric exists, so a warmup would stall until
the first validation, or ``strict=True`` would raise on the first step.) At each step the scheduler
reads ``trainer.callback_metrics[monitor]`` itself and feeds the plateau rule only when the value is a
new one: a validation result stays the same tensor object in ``callback_metrics`` until the next
validation replaces it, so a stale value is recognised without reading it (no host sync). The new
value is read (one sync) once per validation. The reduction therefore applies from the second
optimizer step after the validation that caused it (Lightning's own plateau path: the first).
A monitor that is still missing at the end of a full training epoch after which validation ran (or,
from steps alone, once the first validation epoch has passed) raises SpecError listing the available
metrics with ``strict=True`` (as Lightning does for its own ReduceLROnPlateau), and warns once with
``strict=False``. The epoch-end check is :class:`~lightning_optkit.callbacks.PlateauMonitorCheck`,
which OptimizerMixin adds when a spec has a plateau schedule.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lightning_optkit.errors import SpecError
from lightning_optkit.internals import tensor_version


@dataclass
class Plateau:
    """torch's ReduceLROnPlateau rule as a factor in ``[floor, 1]`` (``factor ** reductions``, clamped)."""

    mode: str = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    floor: float = 0.0
    best: float | None = None
    num_bad: int = 0
    cooldown_left: int = 0
    reductions: int = 0

    def multiplier(self) -> float:
        """The current reduction factor of every group's lr."""
        return max(self.factor**self.reductions, self.floor)

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return not math.isnan(value)
        if self.mode == "min":
            bound = (
                self.best * (1 - self.threshold)
                if self.threshold_mode == "rel"
                else self.best - self.threshold
            )
            return value < bound
        bound = (
            self.best * (1 + self.threshold) if self.threshold_mode == "rel" else self.best + self.threshold
        )
        return value > bound

    def update(self, value: float) -> None:
        """Feed one new metric value (one 'epoch' of ReduceLROnPlateau)."""
        if self._is_better(value):
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            if self.factor**self.reductions > self.floor:
                self.reductions += 1
            self.cooldown_left = self.cooldown
            self.num_bad = 0

    def state(self) -> dict[str, Any]:
        """Plain-data state (for the scheduler's state_dict)."""
        return asdict(self)


def _fingerprint(value: Any) -> Any:
    """Identifies a metric value without reading it: a tensor by its storage and version counter (the
    ``.detach()`` copies Lightning hands out share both), anything else by identity."""
    if isinstance(value, torch.Tensor):
        return (value.data_ptr(), tensor_version(value))  # a metric updated in place is a new value
    return id(value)


class MetricReader:
    """Reads ``trainer.callback_metrics[monitor]``, returning each value once (None when not new).

    Holds the trainer weakly and is dropped from pickles and state_dicts (it is rebuilt by ``create``).
    """

    def __init__(self, trainer: Any, monitor: str, strict: bool) -> None:
        self._trainer = weakref.ref(trainer)
        self.monitor = monitor
        self.strict = strict
        self._last: Any = None  # the last value itself, kept alive so its storage is not reused
        self._last_key: Any = None
        self.warned = False  # strict=False: a missing monitor is reported once

    def new_value(self) -> Any:
        """The monitored value if it changed since the last call, else None."""
        trainer = self._trainer()
        if trainer is None:
            return None
        metrics = trainer.callback_metrics
        value = metrics.get(self.monitor)
        if value is None:
            self._check_missing(trainer, metrics)
            return None
        key = _fingerprint(value)
        if self._last is not None and key == self._last_key:
            return None
        self._last, self._last_key = value, key
        return value

    def _check_missing(self, trainer: Any, metrics: dict[str, Any]) -> None:
        every = getattr(trainer, "check_val_every_n_epoch", None)
        if every is not None and trainer.current_epoch >= every and not trainer.sanity_checking:
            self.report_missing(trainer)

    def report_missing(self, trainer: Any) -> None:
        """The monitor should exist by now but does not: SpecError with ``strict``, else one warning per fit."""
        metrics = sorted(trainer.callback_metrics)
        if self.strict:
            raise SpecError(
                "schedule.monitor",
                self.monitor,
                "log it with self.log(...) (e.g. in "
                "validation_step), or set strict=False to keep the lr until it appears",
                problem=f"is not in trainer.callback_metrics after a training epoch and its validation "
                f"(available: {metrics})",
            )
        if not self.warned:
            self.warned = True
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"The plateau schedule monitors {self.monitor!r}, which is not logged (available: {metrics}); "
                "the lr is not reduced until it appears (strict=False). Log it with self.log, or fix the name.",
                category=RuntimeWarning,
            )
