"""Closed-form learning-rate schedules with warmup, floors and duration strings, built for Lightning."""

from lightning_optkit.schedules.curve import Curve
from lightning_optkit.schedules.plateau import MetricReader, Plateau
from lightning_optkit.schedules.schedule import Schedule
from lightning_optkit.schedules.scheduler import KitLRScheduler
from lightning_optkit.schedules.shapes import (
    ScheduleKind,
    get_schedule_kind,
    register_schedule,
    schedule_names,
)

__all__ = [
    "Curve",
    "KitLRScheduler",
    "MetricReader",
    "Plateau",
    "Schedule",
    "ScheduleKind",
    "get_schedule_kind",
    "register_schedule",
    "schedule_names",
]
