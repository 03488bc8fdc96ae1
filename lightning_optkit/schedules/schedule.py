"""Schedule: a validated learning-rate schedule spec that builds a KitLRScheduler for Lightning."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lightning_optkit.arguments import check_argument
from lightning_optkit.durations import (
    UnknownLength,
    explain_unknown_length,
    fraction_to_count,
    parse_duration,
    resolve_duration,
    trainer_totals,
)
from lightning_optkit.errors import SpecError, closest
from lightning_optkit.schedules.curve import Curve
from lightning_optkit.schedules.plateau import MetricReader, Plateau
from lightning_optkit.schedules.scheduler import KitLRScheduler
from lightning_optkit.schedules.shapes import ScheduleKind, get_schedule_kind
from lightning_optkit.validation import check_keys, flag, number

_FIELDS = ("warmup", "total", "warmup_start_factor", "min_lr_ratio", "interval")
_DEFAULTS: dict[str, Any] = {
    "warmup": 0,
    "total": "100%",
    "warmup_start_factor": 0.0,
    "min_lr_ratio": 0.0,
    "interval": "step",
}


def _coerce_kwarg(kind: ScheduleKind, key: str, value: Any) -> Any:
    """Numeric strings become numbers where the shape's keyword is a number."""
    param = kind.params[key]
    default = param.default
    annotation = getattr(param.annotation, "__name__", str(param.annotation))
    if key in kind.durations:
        takes_list = any(word in str(param.annotation) for word in ("Sequence", "list", "tuple"))
        if isinstance(value, (list, tuple)) and takes_list:
            for i, item in enumerate(value):
                parse_duration(item, field=f"schedule.{key}[{i}]")
            return list(value)
        if takes_list:
            raise SpecError(f"schedule.{key}", value, "give a list of durations, e.g. [1000, 2000] or ['50%', "
                            "'75%']", problem="is not a list")
        if value is None and default is not None:
            raise SpecError(f"schedule.{key}", value, "give a duration: an int (steps), '500steps', '2ep' or '10%'",
                            problem="is not a duration")
        if value is not None:
            parse_duration(value, field=f"schedule.{key}")
        return value
    if isinstance(default, bool) or annotation == "bool":
        return flag(f"schedule.{key}", value, fix="give true or false")
    if isinstance(default, int) or annotation == "int":
        return number(f"schedule.{key}", value, integer=True)
    if isinstance(default, float) or annotation == "float":
        return number(f"schedule.{key}", value)
    return check_argument(f"schedule.{key}", value, param)


def _ratio(field: str, value: Any) -> float:
    """A ratio of each group's lr in [0, 1] (warmup_start_factor, min_lr_ratio)."""
    return number(f"schedule.{field}", value, at_least=0.0, at_most=1.0,
                  fix="give a ratio in [0, 1] of each group's lr")


class Schedule:
    """A learning-rate schedule by name, e.g. ``Schedule("cosine", warmup="5%", min_lr_ratio=0.1)``.

    ``warmup`` and ``total`` are durations (an int of optimizer steps, ``"500steps"``, ``"2ep"``,
    ``"5%"`` or a float in (0, 1)); they are resolved when the scheduler is created. Warmup rises
    linearly from ``warmup_start_factor`` to 1; after ``total`` the multiplier holds its final value.
    ``min_lr_ratio`` is the floor, as a fraction of each group's own lr. ``interval="epoch"`` makes the
    lr change only at epoch boundaries and bare ints count epochs (the scheduler still steps per
    optimizer step, so mid-epoch resumes stay exact). Other keywords go to the shape (see
    :func:`register_schedule`). ``plateau`` takes ReduceLROnPlateau's keywords plus ``monitor`` and
    ``strict`` and may have a warmup (see :mod:`lightning_optkit.schedules.plateau`).
    """

    def __init__(
        self,
        name: str,
        *,
        warmup: Any = 0,
        total: Any = "100%",
        warmup_start_factor: Any = 0.0,
        min_lr_ratio: Any = 0.0,
        interval: str = "step",
        **schedule_kwargs: Any,
    ) -> None:
        self.kind = get_schedule_kind(name)
        self.name = self.kind.name
        parse_duration(warmup, field="schedule.warmup")
        if parse_duration(total, field="schedule.total").amount == 0:
            raise SpecError("schedule.total", total, "give a positive duration (default '100%': the whole fit)",
                            problem="is zero")
        self.warmup = warmup
        self.total = total
        self.warmup_start_factor = _ratio("warmup_start_factor", warmup_start_factor)
        self.min_lr_ratio = _ratio("min_lr_ratio", min_lr_ratio)
        if interval not in ("step", "epoch"):
            raise SpecError(
                "schedule.interval",
                interval,
                "give 'step' or 'epoch' (epoch: the lr changes at "
                "epoch boundaries and bare ints count epochs)",
                problem="is not an interval",
            )
        self.interval = interval
        self.kwargs = self._check_kwargs(schedule_kwargs)
        if self.kind.own_warmup:
            for field in ("warmup", "warmup_start_factor", "min_lr_ratio"):
                if getattr(self, field) != _DEFAULTS[field]:
                    raise SpecError(
                        f"schedule.{field}",
                        getattr(self, field),
                        f"remove it: {self.name!r} has its "
                        "own rise and floor (use pct_start, div_factor, final_div_factor)",
                        problem=f"does not apply to {self.name!r}",
                    )
        self._check_warmup_vs_total(
            parse_duration(self.warmup, field="schedule.warmup"),
            parse_duration(self.total, field="schedule.total"),
        )

    def _check_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kind = self.kind
        for key in kwargs:
            if key not in kind.params:
                near = closest(key, [*kind.params, *_FIELDS])
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise SpecError(
                    f"schedule.{key}",
                    kwargs[key],
                    f"{hint}{self.name!r} takes "
                    f"{sorted(kind.params) or 'no keywords'} besides {list(_FIELDS)}",
                    problem=f"is not a keyword of schedule {self.name!r}",
                )
        missing = [k for k, p in kind.params.items() if p.default is p.empty and k not in kwargs]
        if missing:
            raise SpecError(
                f"schedule.{missing[0]}",
                None,
                f"give {missing[0]}= for schedule {self.name!r}",
                problem="is missing",
            )
        out = {key: _coerce_kwarg(kind, key, value) for key, value in kwargs.items()}
        if kind.validate is not None:
            kind.validate(out)
        return out

    def _check_warmup_vs_total(self, warmup: Any, total: Any) -> None:
        if warmup.amount and warmup.unit == total.unit and warmup.amount >= total.amount:
            raise SpecError(
                "schedule.warmup",
                self.warmup,
                f"make it shorter than total={self.total!r}",
                problem="is not shorter than the schedule",
            )

    # ---- dict / YAML form -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Schedule) -> Schedule:
        """Build from ``{"name": "cosine", "warmup": "5%", ...}`` (the YAML form)."""
        if isinstance(data, Schedule):
            return data
        if not isinstance(data, Mapping) or "name" not in data:
            raise SpecError(
                "schedule",
                data,
                "give a mapping with 'name' (e.g. {name: cosine, warmup: 100})",
                problem="is not a schedule mapping",
            )
        data = check_keys("schedule", data)
        return cls(data.pop("name"), **data)

    def to_dict(self) -> dict[str, Any]:
        """A dict :meth:`from_dict` accepts; fields at their defaults are left out."""
        out: dict[str, Any] = {"name": self.name}
        for field in _FIELDS:
            if getattr(self, field) != _DEFAULTS[field]:
                out[field] = getattr(self, field)
        out.update(self.kwargs)
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")
        return f"Schedule({self.name!r}{', ' if args else ''}{args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    # ---- resolution -------------------------------------------------------------------------------

    def curve(self, total_steps: int | None, steps_per_epoch: int | None = None) -> Curve:
        """Resolve the durations against the fit length and return the closed-form multiplier."""
        tick = 1
        if self.interval == "epoch":
            if not steps_per_epoch:
                raise UnknownLength("schedule.interval", "epoch", "use interval='step'",
                                    problem="needs the steps per epoch, which are unknown", needs="epoch")
            tick = steps_per_epoch
        ticks = None if total_steps is None else math.ceil(total_steps / tick)

        def to_ticks(value: Any, field: str) -> int:
            duration = parse_duration(value, field=field)
            if duration.unit == "fraction" and ticks is not None:
                return fraction_to_count(duration.amount, ticks)
            if tick > 1 and duration.unit == "steps" and not isinstance(value, str):
                return int(duration.amount)  # bare ints count epochs
            steps = resolve_duration(
                value, total_steps=total_steps, steps_per_epoch=steps_per_epoch, field=field
            )
            if steps % tick:
                raise SpecError(
                    field,
                    value,
                    f"give whole epochs ({tick} steps each) or use interval='step'",
                    problem="is not a whole number of epochs",
                )
            return steps // tick

        warmup = to_ticks(self.warmup, "schedule.warmup")
        total = self._resolve_total(to_ticks, ticks)
        if total is not None and warmup >= total:
            raise SpecError(
                "schedule.warmup",
                self.warmup,
                f"make it shorter than total={self.total!r} ({total} {'epochs' if tick > 1 else 'steps'})",
                problem=f"resolves to {warmup}, not shorter than the schedule",
            )
        kwargs = dict(self.kwargs)
        for key in self.kind.durations:
            value = kwargs.get(key, self.kind.params[key].default)
            if isinstance(value, list):
                kwargs[key] = [to_ticks(v, f"schedule.{key}[{i}]") for i, v in enumerate(value)]
            elif value is not None and value is not self.kind.params[key].empty:
                kwargs[key] = to_ticks(value, f"schedule.{key}")
        if self.kind.validate is not None:
            self.kind.validate(kwargs)
        return Curve(
            self.kind.bind(kwargs, warmup),
            warmup,
            total,
            self.warmup_start_factor,
            0.0 if self.kind.follows_metric else self.min_lr_ratio,  # plateau: the floor is the factor's
            tick,
        )

    def _resolve_total(self, to_ticks: Any, ticks: int | None) -> int | None:
        if ticks is None and self.total == _DEFAULTS["total"] and not self.kind.needs_total:
            return None  # an open-ended shape on an infinite fit
        if ticks is None and self.total == _DEFAULTS["total"]:
            raise UnknownLength("schedule.total", self.total, f"give total in steps ('10000steps') for {self.name!r}",
                                problem="is a fraction of training but the training length is unknown",
                                needs="total")
        total = to_ticks(self.total, "schedule.total")
        if total <= 0:
            raise SpecError(
                "schedule.total", self.total, "give a positive duration", problem="resolves to 0 steps"
            )
        return total

    def multipliers(self, total_steps: int, steps_per_epoch: int | None = None) -> list[float]:
        """The multiplier at every step ``0 .. total_steps - 1`` of a fit of ``total_steps`` steps."""
        curve = self.curve(total_steps, steps_per_epoch)
        return [curve(t) for t in range(total_steps)]

    def build(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int | None,
        steps_per_epoch: int | None = None,
        trainer: Any = None,
    ) -> KitLRScheduler:
        """The KitLRScheduler on ``optimizer`` (reads the plateau monitor from ``trainer`` if given)."""
        curve = self.curve(total_steps, steps_per_epoch)
        if not self.kind.follows_metric:
            return KitLRScheduler(optimizer, curve)
        kw = {k: v for k, v in self.kwargs.items() if k not in ("monitor", "strict")}
        plateau = Plateau(**kw, floor=self.min_lr_ratio)
        reader = (
            MetricReader(trainer, self.kwargs["monitor"], self.kwargs.get("strict", True))
            if trainer
            else None
        )
        return KitLRScheduler(optimizer, curve, plateau=plateau, reader=reader)

    def create(
        self,
        optimizer: torch.optim.Optimizer,
        trainer: Any = None,
        *,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Build the scheduler and return Lightning's lr-scheduler config (always ``interval="step"``).

        The fit length comes from ``trainer`` (inside ``configure_optimizers``) unless ``total_steps``
        / ``steps_per_epoch`` are given. Plateau configs also carry ``monitor`` and ``strict`` but are
        stepped like every kit schedule (``reduce_on_plateau=False``; see schedules.plateau for why).
        """
        if trainer is not None:
            trainer_total, trainer_per_epoch = trainer_totals(trainer)
            total_steps = trainer_total if total_steps is None else total_steps
            steps_per_epoch = trainer_per_epoch if steps_per_epoch is None else steps_per_epoch
        try:
            scheduler = self.build(
                optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, trainer=trainer
            )
        except UnknownLength as err:
            if trainer is None:
                raise
            raise explain_unknown_length(err, trainer) from None
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": name}
        if self.kind.follows_metric:
            config.update(
                monitor=self.kwargs["monitor"],
                reduce_on_plateau=False,
                strict=self.kwargs.get("strict", True),
            )
        return config
