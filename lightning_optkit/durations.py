"""Training durations ("500steps", "2ep", "5%", 0.1, 300) and how to resolve them to optimizer steps.

An int counts optimizer steps; ``"Nsteps"`` / ``"Nep"`` count steps / epochs; ``"P%"`` or a float in
(0, 1) is a fraction of the whole fit. Numeric strings (YAML reads ``1e3`` as text) are read as numbers.
Fractions round half up to whole steps.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from lightning_optkit.errors import SpecError
from lightning_optkit.validation import number, number_from_text

_STEPS = re.compile(r"^(\d+)\s*(?:steps?)$", re.IGNORECASE)
_EPOCHS = re.compile(r"^(\d+)\s*(?:ep|epochs?)$", re.IGNORECASE)
_PERCENT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*%$")
_FORMS = "an int (optimizer steps), '500steps', '2ep', '5%' or a float in (0, 1) (fraction of training)"


class UnknownLength(SpecError):
    """A duration or schedule that needs the fit's length (``needs="total"``) or an epoch's (``needs="epoch"``),
    which is unknown where it is resolved.

    ``alternative`` is the schedule-side way out (durations in steps, ``interval='step'``); ``way`` the other
    one, which depends on why the length is unknown: :func:`explain_unknown_length` works it out from the
    Trainer, :func:`lightning_optkit.build_optimizers` says to pass one.
    """

    def __init__(self, field: str, value: object, alternative: str, *, problem: str,
                 needs: Literal["total", "epoch"], way: str | None = None, reason: str | None = None) -> None:
        if way is None:
            way = ("train with a dataloader whose length is known" if needs == "epoch" else
                   "set Trainer(max_steps=...) or a finite max_epochs")
        full = f"{problem}: {reason}" if reason else problem
        super().__init__(field, value, f"{way}, or {alternative}", problem=full)
        self.base_problem, self.alternative, self.needs = problem, alternative, needs

    def explained(self, way: str, reason: str | None = None) -> UnknownLength:
        """The same error with another way out and the reason the length is unknown."""
        return UnknownLength(self.field, self.value, self.alternative, problem=self.base_problem, needs=self.needs,
                             way=way, reason=reason)


@dataclass(frozen=True)
class Duration:
    """A parsed, not yet resolved duration: ``amount`` steps, epochs, or a fraction of training."""

    unit: Literal["steps", "epochs", "fraction"]
    amount: float

    def to_value(self) -> int | str | float:
        """The user-facing form (round-trips through :func:`parse_duration`)."""
        if self.unit == "steps":
            return int(self.amount)
        if self.unit == "epochs":
            return f"{int(self.amount)}ep"
        return f"{self.amount * 100:g}%"


def fraction_to_count(fraction: float, count: int) -> int:
    """``fraction`` of ``count`` steps (or epochs), rounded half up to a whole number: the one rounding rule."""
    return math.floor(fraction * count + 0.5)


def parse_duration(value: Any, *, field: str) -> Duration:
    """Validate ``value`` as a duration (see the module docstring); raise SpecError naming ``field``."""
    if isinstance(value, Duration):
        return value
    if isinstance(value, str):
        text = value.strip()
        for pattern, unit in ((_STEPS, "steps"), (_EPOCHS, "epochs")):
            match = pattern.match(text)
            if match:
                count = number(field, int(match.group(1)), integer=True, strings=False,
                               fix=f"give a count within the float range: {_FORMS}")
                return Duration(unit, count)
        match = _PERCENT.match(text)
        if match:
            pct = float(match.group(1))
            if not 0.0 < pct <= 100.0:
                raise SpecError(field, value, "give a percentage in (0, 100]", problem="is out of range")
            return Duration("fraction", pct / 100.0)
        parsed = number_from_text(text)
        if parsed is None:
            raise SpecError(field, value, f"give {_FORMS}", problem="is not a duration")
        value = parsed
    number(field, value, non_negative=True, strings=False, fix=f"give a non-negative finite duration: {_FORMS}")
    if isinstance(value, int) or float(value).is_integer():
        if isinstance(value, float) and value == 1.0:
            raise SpecError(
                field, value, "write 1 for one step or '100%' for the whole fit", problem="is ambiguous"
            )
        return Duration("steps", int(value))
    if value < 1.0:
        return Duration("fraction", float(value))
    raise SpecError(field, value, f"give {_FORMS}", problem="is a non-integral number of steps")


def resolve_duration(value: Any, *, total_steps: int | None, steps_per_epoch: int | None, field: str) -> int:
    """Optimizer steps for ``value``; fractions need ``total_steps``, epochs need ``steps_per_epoch``."""
    duration = parse_duration(value, field=field)
    if duration.unit == "steps":
        return int(duration.amount)
    if duration.unit == "epochs":
        if not steps_per_epoch:
            raise UnknownLength(field, value, "give the duration in steps (an int or 'Nsteps')",
                                problem="counts epochs but the steps per epoch are unknown", needs="epoch")
        return int(duration.amount) * steps_per_epoch
    if total_steps is None:
        raise UnknownLength(field, value, "give the duration in steps or epochs ('500steps', '2ep')",
                            problem="is a fraction of training but the training length is unknown", needs="total")
    return fraction_to_count(duration.amount, total_steps)


def _finite_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    value = int(value)
    return value if value > 0 else None


def trainer_totals(trainer: Any) -> tuple[int | None, int | None]:
    """``(total_steps, steps_per_epoch)`` in optimizer steps for a Trainer, valid inside configure_optimizers.

    ``total_steps`` is ``trainer.estimated_stepping_batches`` (max_steps, max_epochs, accumulation,
    devices and limit_train_batches counted); steps per epoch are ``ceil(num_training_batches /
    accumulate_grad_batches)`` because Lightning steps on the last batch of an epoch even mid-accumulation.
    Either is None where it is unknown (infinite training, an iterable dataset without a length).
    """
    total = _finite_int(trainer.estimated_stepping_batches)
    batches = trainer.num_training_batches
    if _finite_int(batches) is None and trainer.train_dataloader is None:
        # Infinite fits (max_epochs=-1) return before loading the train dataloader; load it to count epochs.
        trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
    batches = _finite_int(batches)
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if batches else None
    return total, per_epoch


def explain_unknown_length(err: UnknownLength, trainer: Any) -> UnknownLength:
    """``err`` with a reason and fix that name what, in this Trainer's settings, leaves the length unknown.

    An epoch's length is unknown only when the train dataloader has none (an ``IterableDataset`` without
    ``__len__``); the fit's length also when nothing bounds it (``max_epochs=-1`` and ``max_steps=-1``, as
    ``max_time`` alone sets them: it stops on the clock), or when ``max_epochs`` counts epochs of unknown length.
    """
    from lightning.pytorch.callbacks import Timer

    sized = math.isfinite(float(trainer.num_training_batches))
    endless = _finite_int(trainer.max_steps) is None and _finite_int(trainer.max_epochs) is None
    no_len = "the train dataloader has no length (an IterableDataset without __len__)"
    if sized and (err.needs == "epoch" or not endless):
        return err  # e.g. no training batch at all (limit_train_batches=0): the generic text
    if err.needs == "epoch":
        return err.explained("give the dataset a __len__ or set Trainer(limit_train_batches=<int>) (the batches per "
                             "epoch)", no_len)
    if not endless:
        return err.explained("give the dataset a __len__, set Trainer(max_steps=...), or set "
                             "Trainer(limit_train_batches=<int>) (the batches per epoch)",
                             f"Trainer(max_epochs={trainer.max_epochs}) counts epochs, but {no_len}")
    clock = any(isinstance(cb, Timer) for cb in trainer.callbacks)
    bound = ("Trainer(max_time=...) stops on the clock, which counts no steps" if clock
             else f"Trainer(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}) trains until stopped")
    if sized:
        return err.explained("set Trainer(max_steps=...) or a finite max_epochs", bound)
    return err.explained("set Trainer(max_steps=...) (a finite max_epochs is not enough: the dataloader has no "
                         "length)", f"{bound}, and {no_len}")
