"""KitLRScheduler: a torch LRScheduler that sets each group's lr to ``base * curve(step)``."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from lightning_optkit.schedules.curve import Curve
from lightning_optkit.schedules.plateau import MetricReader, Plateau


def _as_float(value: float | torch.Tensor) -> float:
    # Runs once per group when the group is first seen, never per step.
    return float(value)


def _set_lr(group: dict[str, Any], lr: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)  # a Python scalar: no host sync
    else:
        group["lr"] = lr


class KitLRScheduler(LRScheduler):
    """Closed-form schedule: the lr at step ``t`` is ``base_g * curve(t)`` for every param group ``g``.

    * ``base_g`` is the group's ``initial_lr`` (its lr when the scheduler first saw it); groups added
      later with ``optimizer.add_param_group`` are picked up at the next ``step()``.
    * Resuming needs only ``last_epoch`` (the step count): ``state_dict`` holds plain data.
    * ``step()`` never emits torch's "lr_scheduler.step() before optimizer.step()" warning: the kit
      counts Lightning's optimizer steps, including ones skipped by AMP overflow or a skip guard,
      so that the schedule stays aligned with ``trainer.global_step``.
    * With ``plateau``, ``step(metric)`` feeds one new result of the monitored metric (every call with
      a metric counts, as in torch's ReduceLROnPlateau); ``step()`` advances the warmup only, unless a
      ``reader`` fetches new values from a Trainer. The plateau factor multiplies the curve (see
      :mod:`lightning_optkit.schedules.plateau`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        curve: Curve,
        *,
        plateau: Plateau | None = None,
        reader: MetricReader | None = None,
    ) -> None:
        self.curve = curve
        self.plateau = plateau
        self.reader = reader
        self._bases: list[float] = []
        super().__init__(optimizer)

    def _sync_groups(self) -> None:
        groups = self.optimizer.param_groups
        for group in groups[len(self._bases) :]:
            group.setdefault("initial_lr", group["lr"])
            self._bases.append(_as_float(group["initial_lr"]))
        self.base_lrs = list(self._bases)

    def multiplier(self) -> float:
        """The multiplier in force now (curve times plateau factor)."""
        factor = self.curve(self.last_epoch)
        return factor * self.plateau.multiplier() if self.plateau is not None else factor

    def _apply(self) -> None:
        self._sync_groups()
        factor = self.multiplier()
        for group, base in zip(self.optimizer.param_groups, self._bases):
            _set_lr(group, base * factor)
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
            for g in self.optimizer.param_groups
        ]

    def get_lr(self) -> list[float]:
        """The lrs for the current step (``base * multiplier`` per group)."""
        self._sync_groups()
        factor = self.multiplier()
        return [base * factor for base in self._bases]

    def step(self, metrics: Any = None, epoch: None = None) -> None:  # type: ignore[override]
        """Advance one optimizer step; ``metrics`` (plateau only) is a new value of the monitored metric."""
        if epoch is not None:
            raise TypeError("kit schedules count optimizer steps; call step() without an epoch")
        if metrics is not None and self.plateau is None:
            raise TypeError(f"{self.curve.shape!r} is not a plateau schedule; call step() without a metric")
        self._step_count = getattr(self, "_step_count", 0) + 1
        self.last_epoch += 1
        if self.plateau is not None:
            value = metrics if metrics is not None else (self.reader.new_value() if self.reader else None)
            if value is not None:
                self.plateau.update(float(value))  # once per new metric value, not per step
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the step count, the per-group bases and the plateau state."""
        return {
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "base_lrs": list(self._bases),
            "plateau": self.plateau.state() if self.plateau is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count and bases, then set the lrs from the closed form."""
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        self._bases = [float(b) for b in state_dict["base_lrs"]]
        if self.plateau is not None and state_dict.get("plateau"):
            self.plateau = Plateau(**state_dict["plateau"])
        self._apply()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["reader"] = None  # holds a weak reference to the trainer
        return state
