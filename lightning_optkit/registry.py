"""Optimizer registry: one frozen record per name (what it builds, what the kit must know), keyword checks."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import torch

from lightning_optkit.errors import SpecError, closest

OptimizerClass = type[torch.optim.Optimizer]
T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class OptimizerInfo:
    """One registry name: the optimizer it builds and the capabilities the kit checks before training.

    ``target`` is the class, or ``"module:Class"`` imported on first use (so importing the kit stays
    cheap and optional packages stay optional). The capabilities, read by build and the mixin:

    - ``whole_tensor_norms``: the update reads norms of whole tensors or of all gradients (FusedAdamW's
      ``max_grad_norm`` clip and skip, LAMB's trust ratio). Refused where each rank holds flat shards
      (FSDP1, DeepSpeed); under FSDP2 the norms are reduced across ranks, for the placements
      :func:`lightning_optkit.sharding.check_placements` accepts.
    - ``whole_matrix``: the update treats each gradient as one matrix (Muon's orthogonalisation): a
      rank's FSDP2 shard is not one, so it is refused there.
    - ``train_eval_modes``: it trains at other weights than it evaluates at (schedule-free AdamW), so
      the mixin adds ScheduleFreeMode.
    """

    name: str
    target: OptimizerClass | str
    description: str = ""
    whole_tensor_norms: bool = False
    whole_matrix: bool = False
    train_eval_modes: bool = False

    @cached_property
    def cls(self) -> OptimizerClass:
        """The optimizer class (imported now if ``target`` is a path; ImportError if its package is missing)."""
        return self.target if inspect.isclass(self.target) else _load_path(self.target)  # type: ignore[return-value]

    @property
    def available(self) -> bool:
        """Whether the class can be imported (its package is installed)."""
        if inspect.isclass(self.target):
            return True
        return importlib.util.find_spec(self.target.partition(":")[0].split(".")[0]) is not None

    def describes(self, cls: type) -> bool:
        """Whether ``cls`` is this record's class (by identity, or by import path before it is loaded)."""
        if inspect.isclass(self.target):
            return cls is self.target
        return self.target == f"{cls.__module__}:{cls.__qualname__}"


_OPTIMIZERS: dict[str, OptimizerInfo] = {}


def _add(info: OptimizerInfo) -> None:
    _OPTIMIZERS[info.name] = info


def _first_line(cls: type) -> str:
    return (inspect.getdoc(cls) or "").strip().partition("\n")[0]


# torch's own optimizers, by lower-cased class name; Muon orthogonalises each gradient as a whole matrix.
for _attr in dir(torch.optim):
    _obj = getattr(torch.optim, _attr)
    if inspect.isclass(_obj) and issubclass(_obj, torch.optim.Optimizer) and _obj is not torch.optim.Optimizer:
        _add(OptimizerInfo(_attr.lower(), _obj, _first_line(_obj), whole_matrix=_attr == "Muon"))

for _info in (
    OptimizerInfo("momentum_sgd", "lightning_optkit.optim.momentum_sgd:MomentumSGD",
                  "SGD with momentum, foreach and fused updates"),
    OptimizerInfo("lion", "lightning_optkit.optim.lion:Lion", "Lion (sign of interpolated momentum)"),
    OptimizerInfo("lamb", "lightning_optkit.optim.lamb:LAMB", "LAMB (Adam with a per-tensor trust ratio)",
                  whole_tensor_norms=True),
    OptimizerInfo("adan", "lightning_optkit.optim.adan:Adan", "Adan (Nesterov-style adaptive momentum)"),
    OptimizerInfo("schedulefree_adamw", "lightning_optkit.optim.schedulefree:ScheduleFreeAdamW",
                  "schedule-free AdamW (no lr schedule needed)", train_eval_modes=True),
    OptimizerInfo("fused_adamw", "lightning_optkit.optim.fused_adamw:FusedAdamW",
                  "AdamW in one fused pass, with clipping and skipping inside the step", whole_tensor_norms=True),
    OptimizerInfo("bnb_adamw8bit", "bitsandbytes.optim:AdamW8bit", "bitsandbytes 8-bit AdamW"),
    OptimizerInfo("bnb_adam8bit", "bitsandbytes.optim:Adam8bit", "bitsandbytes 8-bit Adam"),
):
    _add(_info)


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


def register_optimizer(name: str, *, overwrite: bool = False, description: str | None = None,
                       whole_tensor_norms: bool = False, whole_matrix: bool = False,
                       train_eval_modes: bool = False) -> Callable[[T], T]:
    """Class decorator: make an optimizer selectable by ``name`` (case-insensitive) in a spec.

    The keywords are its :class:`OptimizerInfo` capabilities. The kit's own classes are listed by import
    path in the registry and keep the capabilities recorded there when their module registers them.
    """
    key = name.lower()

    def decorate(cls: T) -> T:
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            raise TypeError(f"register_optimizer({name!r}) expects a torch.optim.Optimizer subclass, got {cls!r}")
        existing = _OPTIMIZERS.get(key)
        if existing is not None and existing.describes(cls):
            if not inspect.isclass(existing.target):  # the module of a path entry registering its class
                _add(OptimizerInfo(key, cls, existing.description, existing.whole_tensor_norms,
                                   existing.whole_matrix, existing.train_eval_modes))
            return cls
        if existing is not None and not overwrite:
            raise ValueError(
                f"optimizer name {name!r} is already registered to {existing.target}; "
                "pass overwrite=True to replace it"
            )
        _add(OptimizerInfo(key, cls, _first_line(cls) if description is None else description,
                           whole_tensor_norms, whole_matrix, train_eval_modes))
        return cls

    return decorate


def _load_path(path: str) -> Any:
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def list_optimizers(include_unavailable: bool = False) -> list[str]:
    """Registered optimizer names, sorted. Entries whose package is missing are left out."""
    return sorted(name for name, info in _OPTIMIZERS.items() if include_unavailable or info.available)


def optimizer_info(optimizer: str | type) -> OptimizerInfo:
    """The record of a registry name, or of an optimizer class: the nearest registered class in its MRO
    (a subclass of LAMB has LAMB's capabilities); a class the registry does not know gets none."""
    if isinstance(optimizer, str):
        info = _OPTIMIZERS.get(optimizer.lower())
        return info if info is not None else optimizer_info(resolve_optimizer(optimizer))
    for base in inspect.getmro(optimizer):
        for info in _OPTIMIZERS.values():
            if info.describes(base):
                return info
    return OptimizerInfo(optimizer.__name__.lower(), optimizer, _first_line(optimizer))


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
    info = _OPTIMIZERS.get(optimizer.lower())
    if info is not None:
        try:
            return info.cls
        except ImportError as err:
            raise SpecError(field, optimizer, f"install the package that provides it ({err.name})",
                            problem="needs a package that is not installed") from err
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
