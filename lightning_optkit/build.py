"""Turn a plan into torch optimizers and schedulers, in the shape Lightning's ``configure_optimizers`` returns."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_optkit.errors import SpecError
from lightning_optkit.params import OptimizerPlan, plan
from lightning_optkit.spec import ChainSpec, OptimizerSpec, spec_from_data


def _instantiate(op: OptimizerPlan) -> torch.optim.Optimizer:
    spec = op.spec
    kwargs = dict(spec.optimizer_kwargs)
    kwargs["lr"] = spec.lr
    if spec.weight_decay or "weight_decay" in _accepted(spec):
        kwargs["weight_decay"] = spec.weight_decay
    groups = [g.as_dict() for g in op.groups]
    if "weight_decay" not in _accepted(spec):
        for g in groups:
            g.pop("weight_decay")
    try:
        return spec.optimizer_cls(groups, **kwargs)
    except (ValueError, TypeError) as err:
        raise SpecError(op.label, kwargs, "check the optimizer's arguments", problem=f"was rejected by "
                        f"{spec.optimizer_cls.__name__}: {err}") from err


def _accepted(spec: OptimizerSpec) -> set[str]:
    from lightning_optkit.registry import optimizer_keywords

    return set(optimizer_keywords(spec.optimizer_cls))


def _schedule_config(schedule: Any, optimizer: torch.optim.Optimizer, trainer: Any, name: str | None) -> dict | None:
    if schedule is None:
        return None
    return schedule.create(optimizer, trainer, name=name)


def _with_schedule(optimizer: torch.optim.Optimizer, schedule: Any, trainer: Any, name: str | None) -> Any:
    config = _schedule_config(schedule, optimizer, trainer, name)
    if config is None:
        return {"optimizer": optimizer}
    return {"optimizer": optimizer, "lr_scheduler": config}


def build_optimizers(module: nn.Module, spec: Any, trainer: Any = None) -> Any:
    """Build the optimizers (and schedulers) that ``spec`` describes for ``module``.

    Returns what Lightning's ``configure_optimizers`` accepts: an optimizer; a dict with ``optimizer``
    and ``lr_scheduler`` (a config dict with scheduler, interval, frequency, and monitor/name where
    set); or, for several optimizers, a list of such dicts. Param groups carry their ``name``.
    ``trainer`` (the module's, inside ``configure_optimizers``) resolves schedule durations such as
    ``"10%"`` or ``"2ep"``.
    """
    spec = spec_from_data(spec)
    the_plan = plan(module, spec)
    if isinstance(spec, ChainSpec):
        from lightning_optkit.optim.chained import ChainedOptimizer

        members = [_instantiate(op) for op in the_plan.optimizers]
        chained = ChainedOptimizer(members)
        config = _schedule_config(spec.schedule, chained, trainer, spec.name)
        return chained if config is None else {"optimizer": chained, "lr_scheduler": config}
    if isinstance(spec, OptimizerSpec):
        op = the_plan.optimizers[0]
        optimizer = _instantiate(op)
        config = _schedule_config(spec.schedule, optimizer, trainer, spec.name)
        return optimizer if config is None else {"optimizer": optimizer, "lr_scheduler": config}
    return [
        _with_schedule(_instantiate(op), op.spec.schedule, trainer, op.spec.name)
        for op in the_plan.optimizers
    ]
