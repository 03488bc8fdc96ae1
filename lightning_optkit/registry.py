"""Optimizer registry: names to classes, lazy third-party entries, and keyword checks."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from lightning_optkit.errors import SpecError, closest

OptimizerClass = type[torch.optim.Optimizer]
T = TypeVar("T", bound=type)

_REGISTRY: dict[str, OptimizerClass] = {}

# Names resolved on first use, so that importing the kit stays cheap and optional packages stay
# optional: the entry only resolves when its package is installed.
_LAZY: dict[str, str] = {
    "momentum_sgd": "lightning_optkit.optim.momentum_sgd:MomentumSGD",
    "lion": "lightning_optkit.optim.lion:Lion",
    "lamb": "lightning_optkit.optim.lamb:LAMB",
    "adan": "lightning_optkit.optim.adan:Adan",
    "schedulefree_adamw": "lightning_optkit.optim.schedulefree:ScheduleFreeAdamW",
    "fused_adamw": "lightning_optkit.optim.fused_adamw:FusedAdamW",
    "bnb_adamw8bit": "bitsandbytes.optim:AdamW8bit",
    "bnb_adam8bit": "bitsandbytes.optim:Adam8bit",
}

# Keywords people carry over from another optimizer, with where they actually live.
_KEYWORD_HINTS: dict[str, str] = {
    "lr_decay": "only 'adagrad' has lr_decay; for any optimizer use the schedule "
    "Schedule('inverse_time', lr_decay=...)",
    "momentum": "momentum exists on 'sgd', 'rmsprop' and 'momentum_sgd'; Adam-style optimizers take "
    "betas=(beta1, beta2) instead",
    "betas": "betas belong to Adam-style optimizers ('adam', 'adamw', 'lion', ...)",
    "nesterov": "nesterov exists on 'sgd' and 'momentum_sgd'; 'nadam' is Adam with Nesterov momentum",
    "amsgrad": "amsgrad exists on 'adam' and 'adamw'",
    "decoupled_weight_decay": "use optimizer='adamw' for decoupled weight decay",
}


def _torch_optimizers() -> dict[str, OptimizerClass]:
    found: dict[str, OptimizerClass] = {}
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            found[attr.lower()] = obj
    return found


_REGISTRY.update(_torch_optimizers())


def register_optimizer(name: str, *, overwrite: bool = False) -> Callable[[T], T]:
    """Class decorator: make an optimizer selectable by ``name`` (case-insensitive) in a spec."""
    key = name.lower()

    def decorate(cls: T) -> T:
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            raise TypeError(f"register_optimizer({name!r}) expects a torch.optim.Optimizer subclass, got {cls!r}")
        existing = _REGISTRY.get(key)
        if existing is not None and existing is not cls and not overwrite:
            raise ValueError(
                f"optimizer name {name!r} is already registered to {existing.__qualname__}; "
                "pass overwrite=True to replace it"
            )
        _REGISTRY[key] = cls
        _LAZY.pop(key, None)
        return cls

    return decorate


def _load_path(path: str) -> Any:
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def _lazy_available(key: str) -> bool:
    module_name = _LAZY[key].partition(":")[0]
    return importlib.util.find_spec(module_name.split(".")[0]) is not None


def list_optimizers(include_unavailable: bool = False) -> list[str]:
    """Registered optimizer names, sorted. Lazy entries whose package is missing are left out."""
    names = set(_REGISTRY)
    names.update(k for k in _LAZY if include_unavailable or _lazy_available(k))
    return sorted(names)


def resolve_optimizer(optimizer: str | type, field: str = "optimizer") -> OptimizerClass:
    """Turn a registry name, a dotted class path or a class into an optimizer class."""
    if inspect.isclass(optimizer):
        if not issubclass(optimizer, torch.optim.Optimizer):
            raise SpecError(field, optimizer, "pass a torch.optim.Optimizer subclass, a registry name or a "
                            "dotted path", problem="is not a torch.optim.Optimizer subclass")
        return optimizer
    if not isinstance(optimizer, str) or not optimizer:
        raise SpecError(field, optimizer, f"use one of {list_optimizers()[:8]}..., a dotted class path or a class",
                        problem="is not an optimizer name, path or class")
    key = optimizer.lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in _LAZY:
        try:
            cls = _load_path(_LAZY[key])
        except ImportError as err:
            raise SpecError(field, optimizer, f"install the package that provides it ({err.name})",
                            problem="needs a package that is not installed") from err
        _REGISTRY[key] = cls
        return cls
    if "." in optimizer or ":" in optimizer:
        try:
            cls = _load_path(optimizer)
        except (ImportError, AttributeError, ValueError) as err:
            raise SpecError(field, optimizer, "check the module path and class name (e.g. 'torch.optim.AdamW')",
                            problem=f"cannot be imported ({err})") from err
        return resolve_optimizer(cls, field)
    suggestions = closest(optimizer, list_optimizers(include_unavailable=True))
    hint = f"did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    raise SpecError(field, optimizer, f"{hint} list_optimizers() shows every name".strip(),
                    problem="is not a registered optimizer")


def optimizer_keywords(cls: OptimizerClass) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``cls.__init__`` accepts, excluding ``params``."""
    sig = inspect.signature(cls.__init__)
    return {
        n: p for n, p in sig.parameters.items()
        if n not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def accepts_any_keyword(cls: OptimizerClass) -> bool:
    """True when ``cls.__init__`` takes ``**kwargs`` (then keywords cannot be checked)."""
    sig = inspect.signature(cls.__init__)
    return any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def check_optimizer_kwargs(cls: OptimizerClass, kwargs: dict[str, Any], field: str = "optimizer",
                           prefix: str = "") -> None:
    """Fail with a SpecError naming the keyword (after ``prefix``, e.g. ``groups[head].``), the valid ones
    and a hint, if ``cls`` rejects one."""
    if accepts_any_keyword(cls):
        return
    valid = optimizer_keywords(cls)
    for key in kwargs:
        if key in valid:
            continue
        hint = _KEYWORD_HINTS.get(key)
        near = closest(key, valid)
        fix = hint or (f"did you mean {near[0]!r}?" if near else "remove it")
        raise SpecError(
            f"{prefix}{key}", kwargs[key],
            f"{fix}. {cls.__name__} accepts: {', '.join(sorted(valid))}",
            problem=f"is not a keyword of {cls.__name__}",
        )
