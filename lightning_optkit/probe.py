"""The dry run at build time: the spec's optimizer and schedule stepped on probe parameters.

Some arguments pass construction and fail only at the first step: ``capturable=True`` on CPU
parameters, SparseAdam on dense gradients, a fused kernel without support for the dtype, a StepLR with
``step_size: 0``, a LambdaLR whose lambda is a string. :func:`build_optimizers` therefore builds the
optimizer once more on small probe parameters (one per param group, with the device, dtype and number
of dimensions of the group's first real parameter), gives them a gradient of the layout the real ones
will get (sparse only for the weights of ``sparse=True`` embeddings), steps it twice and steps a torch
scheduler on it, all before the first batch. A failure is a SpecError naming the argument without
which the step works (or the optimizer, when no single argument is to blame). The real parameters
and the real optimizer are never touched.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_optkit.errors import SpecError

# How many steps the dry run takes: two, as the first step of most optimizers differs from the later ones
# (state initialised, bias corrections); a scheduler takes fewer on a fit known to be shorter.
OPTIMIZER_PROBE_STEPS = 2
SCHEDULER_PROBE_STEPS = 2


def sparse_grad_ids(module: nn.Module) -> frozenset[int]:
    """Ids of the parameters whose gradient will be sparse: weights of Embedding/EmbeddingBag(sparse=True)."""
    return frozenset(id(m.weight) for m in module.modules()
                     if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse)


def _probe_groups(groups: Sequence[dict[str, Any]], sparse_ids: frozenset[int]
                  ) -> tuple[list[dict[str, Any]], list[tuple[nn.Parameter, torch.Tensor]]] | None:
    """Param group dicts with one probe parameter each, and the gradient each probe gets; None on meta."""
    probe_groups, probes = [], []
    for group in groups:
        real = group["params"][0]
        if real.device.type == "meta":  # deferred initialisation: nothing can run yet
            return None
        shape = (2,) * real.ndim
        probe = nn.Parameter(torch.full(shape, 0.5, dtype=real.dtype, device=real.device))
        grad = torch.full(shape, 0.25, dtype=real.dtype, device=real.device)
        if all(id(p) in sparse_ids for p in group["params"]):
            grad = grad.to_sparse()
        probe_groups.append({**group, "params": [probe]})
        probes.append((probe, grad))
    return probe_groups, probes


def _step(optimizer: torch.optim.Optimizer) -> None:
    """One step. An optimizer whose step requires a closure (LBFGS re-evaluates the loss several times per
    step) gets one computing ``sum |p|^2`` and its gradients; the others keep the gradients set."""
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is None or closure.default is not inspect.Parameter.empty:
        optimizer.step()
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def loss_and_grads() -> torch.Tensor:
        with torch.enable_grad():
            for p in params:
                p.grad = None
            loss = sum(torch.sum(p.abs() ** 2) for p in params)
            loss.backward()
        return loss.detach()

    optimizer.step(loss_and_grads)


def _attempt(cls: type, groups: Sequence[dict[str, Any]], kwargs: dict[str, Any], sparse_ids: frozenset[int]
             ) -> tuple[torch.optim.Optimizer | None, BaseException | None]:
    """(the probe optimizer after its steps, None) or (None, the error); (None, None) when it cannot run."""
    made = _probe_groups(groups, sparse_ids)
    if made is None:
        return None, None
    probe_groups, probes = made
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = cls(probe_groups, **kwargs)
            for _ in range(OPTIMIZER_PROBE_STEPS):
                for probe, grad in probes:
                    probe.grad = grad.clone()
                _step(optimizer)
    except Exception as err:  # noqa: BLE001 - any failure of a probe step is a failure of the real first step
        return None, err
    return optimizer, None


def probe_optimizer_step(cls: type, groups: list[dict[str, Any]], kwargs: dict[str, Any], *,
                         optimizer_name: Any, user_kwargs: Sequence[str],
                         group_options: Sequence[tuple[str, Sequence[str]]],
                         sparse_ids: frozenset[int], split_by: str = "groups",
                         set_by: Sequence[dict[str, tuple[str, Any]]] = ()
                         ) -> Callable[[], torch.optim.Optimizer] | None:
    """Build ``cls(groups, **kwargs)`` on probe parameters and step it twice; SpecError if that fails.

    ``user_kwargs`` (keys of ``kwargs``) and ``group_options`` (``(label, keys)`` per ParamGroup, e.g.
    ``("groups[head]", ["momentum"])``) are the arguments the spec gave, the candidates to blame with
    ``lr`` and ``weight_decay`` (tried at the optimizer's defaults, first in the groups whose value a
    group field set: ``set_by[i]["lr"]`` is ``(field, value)`` for torch group ``i``); then the split into
    several param groups (named ``split_by``: the spec field that made it) when one group works.
    Returns a function making a fresh probe optimizer that has stepped (for
    :func:`probe_scheduler`), or None when the parameters are on the meta device.
    """
    optimizer, error = _attempt(cls, groups, kwargs, sparse_ids)
    if error is None:
        return None if optimizer is None else (lambda: _attempt(cls, groups, kwargs, sparse_ids)[0])
    device = groups[0]["params"][0].device.type
    where = f"{device} parameters of dtype {str(groups[0]['params'][0].dtype).replace('torch.', '')}"
    detail = f"{type(error).__name__}: {error}".strip()
    problem = f"makes {cls.__name__}'s first steps fail on {where} ({detail})"
    for key in user_kwargs:
        if _attempt(cls, groups, {k: v for k, v in kwargs.items() if k != key}, sparse_ids)[1] is None:
            raise SpecError(key, kwargs[key], f"remove it, or give a value {cls.__name__} supports there",
                            problem=problem) from None
    signature = inspect.signature(cls.__init__).parameters
    for key in ("lr", "weight_decay"):  # the optimizer's own default, where a group field set it, then everywhere
        default = signature[key].default if key in signature else inspect.Parameter.empty
        if key not in kwargs or default is inspect.Parameter.empty:
            continue
        by_field = dict.fromkeys(s[key] for s in set_by if key in s and s[key][0] != key)
        for field, value in [*by_field, (key, kwargs[key])]:
            everywhere = field == key
            reset = [{**g, key: default} if key in g and (everywhere or (set_by[i].get(key) or ("",))[0] == field)
                     else g for i, g in enumerate(groups)]
            args = {**kwargs, key: default} if everywhere else kwargs
            if _attempt(cls, reset, args, sparse_ids)[1] is None:
                raise SpecError(field, value, f"give a smaller value (or one {cls.__name__} supports there)",
                                problem=problem) from None
    for label, keys in group_options:
        for key in keys:
            trimmed = [{k: v for k, v in g.items() if k != key} for g in groups]
            if _attempt(cls, trimmed, kwargs, sparse_ids)[1] is None:
                value = next(g[key] for g in groups if key in g)
                raise SpecError(f"{label}.{key}", value, f"remove it, or give a value {cls.__name__} supports "
                                "there", problem=problem) from None
    if len(groups) > 1 and _attempt(cls, groups[:1], kwargs, sparse_ids)[1] is None:
        raise SpecError(split_by, f"{len(groups)} param groups", f"give {cls.__name__} a single group: no groups, "
                        "no layer_decay and no_decay: null", problem=f"is rejected by {cls.__name__} ({detail})"
                        ) from None
    raise SpecError("optimizer", optimizer_name, "choose an optimizer that can step these parameters (e.g. "
                    "SparseAdam needs nn.Embedding(sparse=True) weights; 'adam' takes dense gradients)",
                    problem=f"fails in its first steps on {where} ({detail})") from None


def probe_scheduler(make: Callable[..., Any], new_optimizer: Callable[[], torch.optim.Optimizer], *,
                    field: str, kwargs: dict[str, Any], required: Sequence[str], steps: int,
                    plateau: bool) -> None:
    """Create ``make(optimizer, **kwargs)`` on a fresh probe optimizer and step both ``steps`` times.

    A failure is a SpecError naming the argument in ``kwargs`` without which it works, else the one
    required argument given, else the scheduler (``field``).
    """

    def attempt(args: dict[str, Any]) -> BaseException | None:
        optimizer = new_optimizer()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scheduler = make(optimizer, **args)
                for _ in range(steps):
                    _step(optimizer)
                    if plateau:
                        scheduler.step(1.0)
                    else:
                        scheduler.step()
        except Exception as err:  # noqa: BLE001 - the real first scheduler steps would fail the same way
            return err
        return None

    error = attempt(kwargs)
    if error is None:
        return
    problem = f"makes the scheduler fail when created or stepped ({type(error).__name__}: {error})"
    for key in [k for k in kwargs if k not in required]:
        if attempt({k: v for k, v in kwargs.items() if k != key}) is None:
            raise SpecError(f"{field}.{key}", kwargs[key], "remove it, or give a value the scheduler accepts",
                            problem=problem) from None
    given = [k for k in required if k in kwargs]
    if len(given) == 1:
        raise SpecError(f"{field}.{given[0]}", kwargs[given[0]], "give a value the scheduler accepts",
                        problem=problem) from None
    raise SpecError(field, kwargs, "check the scheduler's arguments against its documentation",
                    problem=problem) from None


def _curve_failure(curve: Any, points: Sequence[int]) -> str | None:
    """Why ``curve`` fails at one of ``points`` (an exception or a non-finite value), or None."""
    for step in sorted({p for p in points if p >= 0}):
        try:
            value = curve(step)
        except Exception as err:  # noqa: BLE001 - a shape's failure, reported before training
            return f"fails at step {step} ({type(err).__name__}: {err})"
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"gives {value!r} at step {step}"
    return None


def check_curve(curve: Any, points: Sequence[int], given: dict[str, Any], field: str = "schedule") -> None:
    """Evaluate a kit schedule's multiplier (a :class:`~lightning_optkit.schedules.curve.Curve`) at
    ``points`` (its ends and phase boundaries): every value must be a finite number, so a shape that
    divides by a zero-length phase or overflows fails now, not mid-fit. The SpecError names the
    keyword of ``given`` (the schedule's own) without which it works, else the one required keyword."""
    problem = _curve_failure(curve, points)
    if problem is None:
        return
    shape = curve.shape
    bound = getattr(shape, "kwargs", None)
    if isinstance(bound, dict) and callable(getattr(shape, "fn", None)):
        params = inspect.signature(shape.fn).parameters
        for key in given:
            if key in bound and key in params and params[key].default is not inspect.Parameter.empty:
                trimmed = dataclasses.replace(curve, shape=type(shape)(shape.fn, {k: v for k, v in bound.items()
                                                                                  if k != key}))
                if _curve_failure(trimmed, points) is None:
                    raise SpecError(f"{field}.{key}", given[key], "give a value the schedule can use",
                                    problem=f"breaks the schedule, which {problem}")
        required = [k for k in given if k in params and params[k].default is inspect.Parameter.empty]
        if len(required) == 1:
            raise SpecError(f"{field}.{required[0]}", given[required[0]], "give a value the schedule can use",
                            problem=f"breaks the schedule, which {problem}")
    raise SpecError(field, given, "check the schedule's arguments (or the registered shape function)",
                    problem=f"breaks the schedule, which {problem}")
