"""Turn a plan into torch optimizers and schedulers, in the shape Lightning's ``configure_optimizers`` returns."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_optkit.durations import UnknownLength
from lightning_optkit.errors import SpecError
from lightning_optkit.params import OptimizerPlan, Plan, plan
from lightning_optkit.probe import (
    SCHEDULER_PROBE_STEPS,
    check_curve,
    probe_optimizer_step,
    probe_scheduler,
    sparse_grad_ids,
)
from lightning_optkit.registry import optimizer_info, optimizer_keywords
from lightning_optkit.schedules.scheduler import KitLRScheduler
from lightning_optkit.sharding import any_sharded, check_placements
from lightning_optkit.spec import TorchScheduleSpec
from lightning_optkit.spec_set import normalise_spec


def _constructor_args(op: OptimizerPlan) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The param group dicts and keyword arguments the optimizer of ``op`` is constructed with."""
    spec = op.spec
    has_decay = "weight_decay" in optimizer_keywords(spec.optimizer_cls)
    kwargs = {**spec.optimizer_kwargs, "lr": spec.lr}
    if has_decay:
        kwargs["weight_decay"] = spec.weight_decay
    groups = [g.as_dict() for g in op.groups]
    if not has_decay:
        for g in groups:
            g.pop("weight_decay")
    return groups, kwargs


def _probe(op: OptimizerPlan, sparse_ids: frozenset[int]) -> Callable[[], torch.optim.Optimizer] | None:
    """Step the optimizer of ``op`` on probe parameters (see :mod:`lightning_optkit.probe`)."""
    groups, kwargs = _constructor_args(op)
    spec = op.spec
    options = [(f"groups[{g.name}]" if g.name else "groups[]", list(g.options)) for g in spec.groups if g.options]
    split_by = "groups" if spec.groups else "layer_decay" if spec.layer_decay else "no_decay"
    named = {g.name: g for g in spec.groups if g.name}
    set_by: list[dict[str, tuple[str, Any]]] = []
    for torch_group in op.groups:  # which group field set each torch group's lr and weight decay
        group = named.get(torch_group.name.split("/")[0])
        fields: dict[str, tuple[str, Any]] = {}
        if group is not None:
            for key, attr in (("lr", "lr"), ("lr", "lr_scale"), ("weight_decay", "weight_decay")):
                if key not in fields and getattr(group, attr) is not None:
                    fields[key] = (f"groups[{group.name}].{attr}", getattr(group, attr))
        set_by.append(fields)
    return probe_optimizer_step(spec.optimizer_cls, groups, kwargs, optimizer_name=spec.optimizer,
                                user_kwargs=list(spec.optimizer_kwargs), group_options=options,
                                sparse_ids=sparse_ids, split_by=split_by, set_by=set_by)


def _instantiate(op: OptimizerPlan) -> torch.optim.Optimizer:
    spec = op.spec
    groups, kwargs = _constructor_args(op)
    try:
        optimizer = spec.optimizer_cls(groups, **kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        raise SpecError(op.label, kwargs, "check the optimizer's arguments against its documentation",
                        problem=f"was rejected by {spec.optimizer_cls.__name__}: {err}") from err
    optimizer.optkit_name = op.label  # the name callbacks use in logged keys
    return optimizer


def _probe_torch_schedule(schedule: Any, new_optimizer: Callable[[], torch.optim.Optimizer] | None,
                          trainer: Any) -> None:
    """Before the real scheduler is made: create and step a torch scheduler on a probe optimizer."""
    if not isinstance(schedule, TorchScheduleSpec) or new_optimizer is None:
        return
    limit = getattr(trainer, "max_steps", -1) if schedule.interval == "step" else getattr(trainer, "max_epochs", -1)
    steps = SCHEDULER_PROBE_STEPS
    if isinstance(limit, int) and limit >= 0:  # a fit known to be shorter steps its scheduler fewer times
        steps = min(steps, limit // schedule.frequency)
    required = [n for n, p in inspect.signature(schedule.cls.__init__).parameters.items()
                if p.default is p.empty and n not in ("self", "optimizer")]
    probe_scheduler(schedule.cls, new_optimizer, field="schedule", kwargs=schedule.kwargs, required=required,
                    steps=steps, plateau=issubclass(schedule.cls, torch.optim.lr_scheduler.ReduceLROnPlateau))


def _check_kit_curve(schedule: Any, config: dict | None) -> None:
    """A kit schedule's multiplier evaluated at its ends and phase boundaries, before the first batch."""
    if config is None or not isinstance(config["scheduler"], KitLRScheduler):
        return
    curve = config["scheduler"].curve
    start = curve.warmup_end_step()
    end = curve.total * curve.tick if curve.total is not None else start + 10
    check_curve(curve, [0, 1, 2, start - 1, start, start + 1, (start + end) // 2, end - 2, end - 1, end, end + 1],
                dict(getattr(schedule, "kwargs", {})))


def _schedule(schedule: Any, optimizer: torch.optim.Optimizer, trainer: Any, name: str | None,
              total_steps: int | None = None) -> dict | None:
    """Lightning's lr-scheduler config for ``schedule`` on ``optimizer`` (None without a schedule)."""
    if schedule is None:
        return None
    kwargs = {"name": name}
    if total_steps is not None:
        kwargs["total_steps"] = total_steps
    try:
        return schedule.create(optimizer, trainer, **kwargs)
    except UnknownLength as err:
        if trainer is not None:
            raise
        raise err.explained("call build_optimizers(module, spec, trainer=self.trainer) inside configure_optimizers "
                            "(or use OptimizerMixin)", "no trainer was given") from None


def _per_optimizer_total(trainer: Any, optimizers: int) -> int | None:
    """Steps each of several manually stepped optimizers takes in the fit.

    In manual optimization ``max_steps`` counts the steps of all optimizers together, so with ``k``
    optimizers each stepped once per batch the fit ends after ``max_steps / k`` batches. (Stepping one
    optimizer several times per batch, as in an n-critic loop, needs durations in steps.)
    """
    if trainer is None or optimizers < 2 or trainer.max_steps is None or trainer.max_steps < 0:
        return None
    from lightning_optkit.durations import trainer_totals

    total, per_epoch = trainer_totals(trainer)
    by_steps = math.ceil(trainer.max_steps / optimizers)
    by_epochs = per_epoch * trainer.max_epochs if per_epoch and trainer.max_epochs and trainer.max_epochs > 0 else None
    return min(by_steps, by_epochs) if by_epochs else by_steps


def _refuse_per_shard_rules(optimizers: list[OptimizerPlan], trainer: Any) -> None:
    """Refuse optimizers whose rule reads whole tensors where the kit cannot see whole tensors.

    By the capabilities of their registry records (:class:`~lightning_optkit.registry.OptimizerInfo`).
    Under FSDP1 (``FSDPStrategy``) or DeepSpeed each rank's optimizer holds flat shards: a rule with
    ``whole_tensor_norms`` (FusedAdamW's global-norm clip and whole-step skip, LAMB's per-tensor trust
    ratio) would be per shard, and the skip could differ between ranks, silently. Under FSDP2
    (``ModelParallelStrategy``, DTensor parameters) those norms are reduced across ranks, for the
    layouts :func:`lightning_optkit.sharding.check_placements` accepts; a ``whole_matrix`` rule
    (``torch.optim.Muon`` orthogonalises each gradient as one matrix) is refused there, as a rank's
    shard is not the matrix.
    """
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if strategy is not None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
            for op in optimizers:
                if optimizer_info(op.spec.optimizer_cls).whole_tensor_norms:
                    raise SpecError("optimizer", op.spec.optimizer_cls.__name__,
                                    "shard with FSDP2 instead (Trainer(strategy=ModelParallelStrategy(...)) and "
                                    "fully_shard in configure_model), where it is exact; or use an element-wise "
                                    "optimizer (adamw, lion, adan, momentum_sgd); or train with strategy='ddp'",
                                    problem=f"computes norms across whole tensors, but {type(strategy).__name__} "
                                    "gives each rank only flat shards of them")
    for op in optimizers:
        named = [(name, p) for group in op.groups for name, p in zip(group.names, group.params, strict=True)]
        if not any_sharded(p for _, p in named):
            continue
        cls = op.spec.optimizer_cls
        info = optimizer_info(cls)
        if info.whole_matrix:
            raise SpecError("optimizer", cls.__name__, "give the 2-D hidden weights to adamw (or lion, adan) "
                            "under FSDP2, or train the Muon hybrid with strategy='ddp'",
                            problem="orthogonalises each gradient as a whole matrix, but under FSDP2 a rank "
                            f"holds only a shard of it (parameter {named[0][0]!r} is a DTensor)")
        if info.whole_tensor_norms:
            check_placements(named, f"optimizer {cls.__name__}")


def _refuse_complex(optimizers: list[OptimizerPlan], field: str) -> None:
    """A complex parameter given to a kit optimizer that cannot train one: a SpecError naming the parameter.

    The optimizers refuse it at construction too, but only know its position; here the name is known.
    """
    from lightning_optkit.optim.fused_adamw import COMPLEX_FIX

    for i, op in enumerate(optimizers):
        cls = op.spec.optimizer_cls
        if getattr(cls, "supports_complex", True):
            continue
        for group in op.groups:
            for name, p in zip(group.names, group.params, strict=True):
                if torch.is_complex(p):
                    where = f"{field}[{i}].params" if field != "spec" else "params"
                    raise SpecError(where, name, COMPLEX_FIX, problem=f"is a complex parameter ({p.dtype}), which "
                                    f"{cls.__name__} cannot train")


def _refuse_lightning_clip_of_fused(optimizers: list[torch.optim.Optimizer], module: nn.Module, trainer: Any) -> None:
    """Refuse ``Trainer(gradient_clip_val=...)`` where Lightning would raise at the first batch.

    Lightning 2.6.6's mixed-precision plugin (``16-mixed``, ``bf16-mixed``) raises a RuntimeError in its
    ``clip_gradients`` for an optimizer that sets ``_step_supports_amp_scaling`` (it unscales inside
    its step: FusedAdamW, torch's ``fused=True`` optimizers), when automatic optimization reaches
    Lightning's own ``configure_gradient_clipping``. Same test, raised before training, with the fix.
    """
    clip = getattr(trainer, "gradient_clip_val", None) if trainer is not None else None
    if not clip:
        return
    from lightning.pytorch import LightningModule
    from lightning.pytorch.plugins.precision import MixedPrecision

    if not isinstance(getattr(trainer, "precision_plugin", None), MixedPrecision):
        return
    if not isinstance(module, LightningModule) or not module.automatic_optimization:
        return
    if type(module).configure_gradient_clipping is not LightningModule.configure_gradient_clipping:
        return  # the module clips its own way; Lightning's check may not run
    from lightning_optkit.optim.fused_adamw import FusedAdamW

    for optimizer in optimizers:
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            continue
        name = type(optimizer).__name__
        algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").lower()
        callback = (f"GradientClipping(algorithm='value', max_value={clip})" if "value" in algorithm
                    else f"GradientClipping(max_norm={clip})")
        fix = f"remove gradient_clip_val and add {callback} to the Trainer's callbacks"
        if isinstance(optimizer, FusedAdamW) and "value" not in algorithm:
            fix = (f"remove gradient_clip_val and set max_grad_norm: {clip} in the spec (clipped inside the fused "
                   f"step), or add {callback} to the Trainer's callbacks")
        raise SpecError("Trainer(gradient_clip_val)", clip, fix,
                        problem=f"cannot clip {name} under precision={trainer.precision!r}: Lightning refuses its "
                        "own clipping for optimizers that unscale gradients inside their step")


def _probe_all(the_plan: Plan, sparse_ids: frozenset[int]) -> list[Any]:
    """Dry-run each optimizer of the plan (:mod:`lightning_optkit.probe`); a chain member's error names it."""
    probes = []
    for i, op in enumerate(the_plan.optimizers):
        try:
            probes.append(_probe(op, sparse_ids))
        except SpecError as err:
            if the_plan.specs.kind != "chain":
                raise
            raise SpecError(f"chain[{i}].{err.field}", err.value, err.fix, problem=err.problem) from None
    return probes


def build_optimizers(module: nn.Module, spec: Any, trainer: Any = None) -> Any:
    """Build the optimizers (and schedulers) that ``spec`` describes for ``module``.

    Returns what Lightning's ``configure_optimizers`` accepts: an optimizer; a dict with ``optimizer``
    and ``lr_scheduler`` (a config dict with scheduler, interval, frequency, and monitor/name where
    set); or, for several optimizers, a list of such dicts. Param groups carry their ``name``.
    ``trainer`` (the module's, inside ``configure_optimizers``) resolves schedule durations such as
    ``"10%"`` or ``"2ep"``.
    """
    specs = normalise_spec(spec)
    the_plan = plan(module, specs)
    _refuse_per_shard_rules(the_plan.optimizers, trainer)
    _refuse_complex(the_plan.optimizers, specs.field)
    probes = _probe_all(the_plan, sparse_grad_ids(module))
    if specs.chain is not None:
        from lightning_optkit.optim.chained import ChainedOptimizer

        chain = specs.chain
        optimizer: torch.optim.Optimizer = ChainedOptimizer([_instantiate(op) for op in the_plan.optimizers])
        optimizer.optkit_name = chain.label
        _refuse_lightning_clip_of_fused([optimizer], module, trainer)
        chained = None if None in probes else (lambda: ChainedOptimizer([make() for make in probes]))
        _probe_torch_schedule(chain.schedule, chained, trainer)
        config = _schedule(chain.schedule, optimizer, trainer, chain.name)
        _check_kit_curve(chain.schedule, config)
    elif specs.kind == "single":
        only = specs.members[0]
        optimizer = _instantiate(the_plan.optimizers[0])
        _refuse_lightning_clip_of_fused([optimizer], module, trainer)
        _probe_torch_schedule(only.schedule, probes[0], trainer)
        config = _schedule(only.schedule, optimizer, trainer, only.name)
        _check_kit_curve(only.schedule, config)
    else:
        total = _per_optimizer_total(trainer, len(the_plan.optimizers))
        result = []
        for op, probe in zip(the_plan.optimizers, probes):
            optimizer = _instantiate(op)
            _probe_torch_schedule(op.spec.schedule, probe, trainer)
            config = _schedule(op.spec.schedule, optimizer, trainer, op.spec.name, total)
            _check_kit_curve(op.spec.schedule, config)
            result.append({"optimizer": optimizer} if config is None else {"optimizer": optimizer,
                                                                         "lr_scheduler": config})
        return result
    return optimizer if config is None else {"optimizer": optimizer, "lr_scheduler": config}
