"""The declarative optimizer spec: OptimizerSpec, ParamGroup, ChainSpec, validated at construction.

A spec is written in Python, as a dict or as YAML. Everything that can be checked without the model
is checked here (types, numbers, names, keywords against the optimizer's signature); what needs the
model (patterns that match nothing, overlaps, leftovers) is checked by :func:`lightning_optkit.plan`.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_optkit.arguments import check_argument
from lightning_optkit.errors import SpecError, closest
from lightning_optkit.registry import check_optimizer_kwargs, optimizer_keywords, resolve_optimizer
from lightning_optkit.validation import check_keys, flag, number

# A parameter selector: a glob on the qualified name, "re:<regex>", "type:<dotted.Module>", a module
# class, a predicate (name, param) -> bool, a list of those (any matches), or a mapping
# {"match": <selector>, "ndim": 2 or [..], "exclude": <selector>} (all conditions hold; YAML-friendly).
Selector = str | type | Callable[[str, torch.nn.Parameter], bool] | Sequence[Any]

_WD_FIX = "give a number >= 0 (0 disables it)"
# OptimizerSpec.frozen: "skip" leaves requires_grad=False parameters out of the plan; "include" plans them
# like trainable ones (optimizers skip a parameter whose grad is None, so it stays untouched while frozen).
FROZEN_MODES = ("skip", "include")


def check_selector(field_name: str, selector: Any) -> None:
    """Reject selectors that are not of a supported form (their matches are checked against a model later)."""
    if isinstance(selector, str):
        if not selector:
            raise SpecError(field_name, selector, "give a glob like 'backbone.*'", problem="is empty")
        if selector.startswith("re:"):
            try:
                re.compile(selector[3:])
            except re.error as err:
                raise SpecError(field_name, selector, f"fix the regular expression ({err})",
                                problem="is not a valid regex") from None
        elif selector.startswith("type:"):
            resolve_module_type(field_name, selector[5:])
        return
    if inspect.isclass(selector):
        if not issubclass(selector, torch.nn.Module):
            raise SpecError(field_name, selector, "give a torch.nn.Module subclass such as torch.nn.LayerNorm",
                            problem="is a class that is not a torch.nn.Module")
        return
    if isinstance(selector, Mapping):
        unknown = set(selector) - {"match", "ndim", "exclude"}
        if unknown or not selector:
            raise SpecError(field_name, dict(selector), "a mapping selector takes 'match', 'ndim' and 'exclude', e.g. "
                            "{match: 'blocks.*', ndim: 2}", problem="has unknown or no keys")
        if "match" in selector:
            check_selector(f"{field_name}.match", selector["match"])
        if "exclude" in selector:
            check_selector(f"{field_name}.exclude", selector["exclude"])
        if "ndim" in selector:
            dims = selector["ndim"] if isinstance(selector["ndim"], (list, tuple)) else [selector["ndim"]]
            if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
                raise SpecError(f"{field_name}.ndim", selector["ndim"], "give an integer or a list of integers >= 0",
                                problem="is invalid")
        return
    if isinstance(selector, (list, tuple)):
        if not selector:
            raise SpecError(field_name, selector, "list at least one pattern", problem="is empty")
        for i, item in enumerate(selector):
            if isinstance(item, (list, tuple)):
                raise SpecError(f"{field_name}[{i}]", item, "flatten the list", problem="is a nested list")
            check_selector(f"{field_name}[{i}]", item)
        return
    if callable(selector):
        return
    raise SpecError(field_name, selector, "use a glob, 're:<regex>', 'type:<dotted.Module>', a module class, "
                    "a predicate (name, param) -> bool, or a list of those", problem="is not a parameter selector")


def resolve_module_type(field_name: str, dotted: str) -> type[torch.nn.Module]:
    """Import ``dotted`` (e.g. 'torch.nn.LayerNorm') and check it is a module class."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        cls = getattr(__import__(module_name, fromlist=[attr]), attr) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        raise SpecError(field_name, f"type:{dotted}", "name a module class by its full path, e.g. "
                        "'type:torch.nn.LayerNorm'", problem="does not name a torch.nn.Module class")
    return cls


@dataclass
class ParamGroup:
    """Parameters selected by name pattern or module type, with their own lr or weight decay.

    ``lr`` sets the group's learning rate; ``lr_scale`` multiplies the optimizer's lr instead (not both).
    Extra keywords (e.g. ``momentum=0.8``, ``betas=(0.9, 0.95)``) become per-group optimizer options.
    """

    params: Selector
    name: str | None = None
    lr: float | None = None
    lr_scale: float | None = None
    weight_decay: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        params: Selector,
        *,
        name: str | None = None,
        lr: float | None = None,
        lr_scale: float | None = None,
        weight_decay: float | None = None,
        **group_kwargs: Any,
    ) -> None:
        label = f"groups[{name}]" if name else "groups[]"
        check_selector(f"{label}.params", params)
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise SpecError(f"{label}.name", name, "give a non-empty string without '/'", problem="is not a valid name")
        if lr is not None and lr_scale is not None:
            raise SpecError(f"{label}.lr", lr, "set either lr (absolute) or lr_scale (relative to the optimizer's "
                            "lr), not both", problem=f"conflicts with lr_scale={lr_scale!r}")
        self.params = params
        self.name = name
        self.lr = number(f"{label}.lr", lr, positive=True, allow_none=True)
        self.lr_scale = number(f"{label}.lr_scale", lr_scale, positive=True, allow_none=True)
        self.weight_decay = number(f"{label}.weight_decay", weight_decay, non_negative=True, allow_none=True,
                                   fix=_WD_FIX)
        self.options = dict(group_kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ParamGroup) -> ParamGroup:
        """Build from a dict: ``params`` and the named fields; other keys are per-group optimizer options."""
        if isinstance(data, ParamGroup):
            return data
        if not isinstance(data, Mapping):
            raise SpecError("groups[]", data, "give a mapping with at least 'params'", problem="is not a mapping")
        data = check_keys("groups[]", data)
        if "params" not in data:
            name = data.get("name")
            raise SpecError(f"groups[{name if isinstance(name, str) else ''}].params", None,
                            "add 'params: <pattern>' to the group", problem="is missing")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The dict form (round-trips through :meth:`from_dict` when ``params`` is not a class or callable)."""
        out: dict[str, Any] = {"params": _selector_to_data(self.params)}
        for key in ("name", "lr", "lr_scale", "weight_decay"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.options)
        return out


def _selector_to_data(selector: Any) -> Any:
    if inspect.isclass(selector):
        return f"type:{selector.__module__}.{selector.__qualname__}"
    if isinstance(selector, (list, tuple)):
        return [_selector_to_data(s) for s in selector]
    if isinstance(selector, Mapping):
        return {k: v if k == "ndim" else _selector_to_data(v) for k, v in selector.items()}
    return selector


@dataclass
class TorchScheduleSpec:
    """A torch (or any) LR scheduler class with its arguments and Lightning's scheduling keys."""

    cls: type
    kwargs: dict[str, Any]
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    strict: bool = True
    name: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], field_name: str = "schedule") -> TorchScheduleSpec:
        """Parse ``{"class": "torch.optim.lr_scheduler.StepLR", "step_size": 5, "interval": "epoch", ...}``."""
        data = check_keys(field_name, data)
        target = data.pop("class")
        sched_cls = _resolve_scheduler_class(f"{field_name}.class", target)
        interval = data.pop("interval", "epoch")
        if interval not in ("step", "epoch"):
            raise SpecError(f"{field_name}.interval", interval, "use 'step' (after every optimizer step) or 'epoch'",
                            problem="is not a Lightning interval")
        frequency = data.pop("frequency", 1)
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise SpecError(f"{field_name}.frequency", frequency, "give an integer >= 1", problem="is invalid")
        monitor = data.pop("monitor", None)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise SpecError(f"{field_name}.monitor", monitor, "name the logged metric, e.g. monitor: val_loss",
                            problem="is not a metric name")
        strict = flag(f"{field_name}.strict", data.pop("strict", True), fix="give true or false")
        name = data.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name):
            raise SpecError(f"{field_name}.name", name, "give a non-empty string (the logged lr key)",
                            problem="is not a valid name")
        is_plateau = issubclass(sched_cls, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if is_plateau and not monitor:
            raise SpecError(f"{field_name}.monitor", monitor, "name the logged metric to watch, e.g. monitor: val_loss",
                            problem=f"is required by {sched_cls.__name__}")
        if monitor and not is_plateau:
            raise SpecError(f"{field_name}.monitor", monitor, f"remove it: {sched_cls.__name__} does not read a metric",
                            problem="would be ignored")
        if issubclass(sched_cls, torch.optim.lr_scheduler.OneCycleLR) and interval == "epoch":
            raise SpecError(f"{field_name}.interval", interval, "OneCycleLR counts optimizer steps: use "
                            "interval: step (or the kit schedule 'onecycle')",
                            problem="steps OneCycleLR once per epoch")
        valid = {
            n: p for n, p in inspect.signature(sched_cls.__init__).parameters.items()
            if n not in ("self", "optimizer") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        for key, value in list(data.items()):
            if key not in valid:
                near = closest(key, valid)
                raise SpecError(f"{field_name}.{key}", value,
                                (f"did you mean {near[0]!r}? " if near else "")
                                + f"{sched_cls.__name__} accepts: {', '.join(sorted(valid))}",
                                problem=f"is not an argument of {sched_cls.__name__}")
            data[key] = check_argument(f"{field_name}.{key}", value, valid[key])
        missing = [n for n, p in valid.items() if p.default is p.empty and n not in data]
        if missing:
            raise SpecError(f"{field_name}.{missing[0]}", None, f"{sched_cls.__name__} needs {', '.join(missing)}",
                            problem="is missing")
        return cls(sched_cls, data, interval, frequency, monitor, bool(strict), name)

    def to_dict(self) -> dict[str, Any]:
        """The dict form accepted by :meth:`from_dict`."""
        out: dict[str, Any] = {"class": f"{self.cls.__module__}.{self.cls.__qualname__}", **self.kwargs,
                               "interval": self.interval, "frequency": self.frequency}
        if self.monitor:
            out["monitor"] = self.monitor
        if not self.strict:
            out["strict"] = False
        if self.name:
            out["name"] = self.name
        return out

    def create(self, optimizer: torch.optim.Optimizer, trainer: Any = None, *, name: str | None = None,
               total_steps: int | None = None) -> dict:
        """Instantiate the scheduler on ``optimizer`` and return Lightning's lr-scheduler config dict.

        ``trainer`` and ``total_steps`` are unused: a torch scheduler takes its lengths as arguments.
        """
        scheduler = self.cls(optimizer, **self.kwargs)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.interval, "frequency": self.frequency}
        if self.name or name:
            config["name"] = self.name or name
        if self.monitor:
            config.update(monitor=self.monitor, strict=self.strict, reduce_on_plateau=True)
        return config


def _resolve_scheduler_class(field_name: str, target: Any) -> type:
    if isinstance(target, str):
        module_name, _, attr = target.rpartition(".")
        if not module_name:
            module_name = "torch.optim.lr_scheduler"
        try:
            target = getattr(__import__(module_name, fromlist=[attr]), attr)
        except (ImportError, AttributeError):
            names = [n for n in dir(torch.optim.lr_scheduler) if n.endswith("LR") or n == "ReduceLROnPlateau"]
            near = closest(attr, names)
            raise SpecError(field_name, target, (f"did you mean 'torch.optim.lr_scheduler.{near[0]}'? " if near
                            else "") + "give the full class path", problem="cannot be imported") from None
    allowed = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if not (inspect.isclass(target) and issubclass(target, allowed)):
        raise SpecError(field_name, target, "give an LRScheduler or ReduceLROnPlateau subclass",
                        problem="is not a learning-rate scheduler class")
    return target


def parse_schedule(value: Any, field_name: str = "schedule") -> Any:
    """Normalise the ``schedule=`` field: None, a kit Schedule, a torch scheduler dict, or a kit schedule dict/name."""
    if value is None or isinstance(value, TorchScheduleSpec):
        return value
    if isinstance(value, Mapping):
        if "class" in value:
            return TorchScheduleSpec.from_dict(value, field_name)
        if "name" in value:
            from lightning_optkit.schedules import Schedule

            return Schedule.from_dict(value)
        raise SpecError(field_name, dict(value), "give 'name' for a kit schedule (e.g. name: cosine) or 'class' for a "
                        "torch scheduler (e.g. class: torch.optim.lr_scheduler.StepLR)",
                        problem="has neither 'name' nor 'class'")
    if isinstance(value, str):
        from lightning_optkit.schedules import Schedule

        return Schedule(value)
    if hasattr(value, "create") and callable(value.create):
        return value
    raise SpecError(field_name, value, "give a Schedule, a schedule name, or a dict", problem="is not a schedule")


class OptimizerSpec:
    """One optimizer: its class, lr, weight decay, parameter groups, no-decay rule, layer decay and schedule.

    ``optimizer`` is a registry name (case-insensitive), a dotted class path or a class. Every extra
    keyword is an optimizer argument, checked against the class's signature now. ``frozen="include"``
    plans frozen (requires_grad=False) parameters too, so they train once unfrozen (see callbacks.Unfreeze).
    """

    def __init__(
        self,
        optimizer: str | type,
        lr: float,
        weight_decay: float = 0.0,
        *,
        params: Selector | None = None,
        groups: Sequence[ParamGroup | Mapping[str, Any]] = (),
        no_decay: str | Sequence[str] | None = "auto",
        layer_decay: Mapping[str, Any] | None = None,
        schedule: Any = None,
        name: str | None = None,
        frozen: str = "skip",
        **optimizer_kwargs: Any,
    ) -> None:
        if frozen not in FROZEN_MODES:
            raise SpecError("frozen", frozen, "use 'skip' (leave frozen parameters out) or 'include' (plan them "
                            "too, so they train once unfrozen, e.g. by callbacks.Unfreeze)",
                            problem="is not a frozen-parameter mode")
        self.frozen = frozen
        self.optimizer_cls = resolve_optimizer(optimizer)
        self.optimizer = optimizer
        label = name or self.optimizer_cls.__name__
        self.lr = number("lr", lr, positive=True)
        self.weight_decay = number("weight_decay", weight_decay, non_negative=True, fix=_WD_FIX)
        if params is not None:
            check_selector("params", params)
        self.params = params
        if isinstance(groups, (str, Mapping)) or not isinstance(groups, Sequence):
            raise SpecError("groups", groups, "give a list of ParamGroup (or dicts)", problem="is not a list")
        self.groups = [ParamGroup.from_dict(g) for g in groups]
        names = [g.name for g in self.groups if g.name]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SpecError("groups[].name", sorted(dup)[0], "give every group a unique name", problem="is used twice")
        self.no_decay = _check_no_decay(no_decay)
        self.layer_decay = _check_layer_decay(layer_decay)
        self.schedule = parse_schedule(schedule)
        if name is not None and (not isinstance(name, str) or not name):
            raise SpecError("name", name, "give a non-empty string", problem="is not a valid name")
        self.name = name
        self.optimizer_kwargs = self._check_kwargs(label, dict(optimizer_kwargs))

    def _check_kwargs(self, label: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        cls = self.optimizer_cls
        for reserved in ("params", "groups"):
            kwargs.pop(reserved, None)
        check_optimizer_kwargs(cls, kwargs)
        valid = optimizer_keywords(cls)
        if "lr" not in valid:
            raise SpecError("optimizer", self.optimizer, "choose an optimizer that has a learning rate",
                            problem=f"({cls.__name__}) takes no lr")
        if self.weight_decay and "weight_decay" not in valid:
            raise SpecError("weight_decay", self.weight_decay, f"set it to 0: {cls.__name__} has no weight decay",
                            problem=f"would be ignored by {cls.__name__}")
        for group in self.groups:
            if group.weight_decay and "weight_decay" not in valid:
                raise SpecError(f"groups[{group.name}].weight_decay", group.weight_decay,
                                f"remove it: {cls.__name__} has no weight decay", problem="would be ignored")
            where = f"groups[{group.name}]." if group.name else "groups[]."
            check_optimizer_kwargs(cls, group.options, prefix=where)
            for key, value in list(group.options.items()):
                if key in valid:
                    group.options[key] = check_argument(where + key, value, valid[key])
        for key, value in list(kwargs.items()):
            if key in valid:  # else the class takes **kwargs: its dry run checks the value
                kwargs[key] = check_argument(key, value, valid[key])
        base = {"lr": self.lr, **({"weight_decay": self.weight_decay} if "weight_decay" in valid else {}), **kwargs}
        defaults = _dry_run(cls, base, "")
        for group in self.groups:
            label = f"groups[{group.name}]" if group.name else "groups[]"
            if defaults is not None:
                for key in group.options:
                    if key not in defaults:
                        raise SpecError(f"{label}.{key}", group.options[key], f"set it on the OptimizerSpec: "
                                        f"{cls.__name__} reads it only when constructed, not per group",
                                        problem="would be ignored per group")
            if group.options:
                _dry_run(cls, {**base, **group.options}, label, candidates=list(group.options))
        return kwargs

    @property
    def label(self) -> str:
        """The optimizer's display name: ``name`` if set, else its class name."""
        return self.name or self.optimizer_cls.__name__

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | OptimizerSpec) -> OptimizerSpec:
        """Build from a dict; every key that is not a spec field is an optimizer keyword."""
        if isinstance(data, OptimizerSpec):
            return data
        if not isinstance(data, Mapping):
            raise SpecError("spec", data, "give a mapping with 'optimizer' and 'lr'", problem="is not a mapping")
        data = check_keys("", data)
        for required in ("optimizer", "lr"):
            if required not in data:
                near = closest(required, data)
                hint = f" (is {near[0]!r} a misspelling of it?)" if near else ""
                raise SpecError(required, None, f"add '{required}:' to the spec{hint}", problem="is missing")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> OptimizerSpec | list[OptimizerSpec] | ChainSpec:
        """Load a spec from a YAML file path or YAML text (a mapping, a list of mappings, or ``chain:``)."""
        return spec_from_data(load_yaml(path_or_text))

    def to_dict(self) -> dict[str, Any]:
        """A dict that :meth:`from_dict` accepts (for ``save_hyperparameters`` and YAML)."""
        opt = self.optimizer if isinstance(self.optimizer, str) else \
            f"{self.optimizer_cls.__module__}.{self.optimizer_cls.__qualname__}"
        out: dict[str, Any] = {"optimizer": opt, "lr": self.lr, "weight_decay": self.weight_decay}
        if self.params is not None:
            out["params"] = _selector_to_data(self.params)
        if self.groups:
            out["groups"] = [g.to_dict() for g in self.groups]
        if self.no_decay != "auto":
            out["no_decay"] = self.no_decay
        if self.layer_decay:
            out["layer_decay"] = dict(self.layer_decay)
        if self.schedule is not None:
            out["schedule"] = self.schedule.to_dict()
        if self.name:
            out["name"] = self.name
        if self.frozen != "skip":
            out["frozen"] = self.frozen
        out.update(self.optimizer_kwargs)
        return out

    def __repr__(self) -> str:
        return f"OptimizerSpec({self.to_dict()!r})"


class ChainSpec:
    """Several optimizers stepped as one (e.g. Muon for hidden matrices + AdamW for the rest), one schedule.

    The members partition the parameters like a list of specs does, but the result is a single
    :class:`~lightning_optkit.optim.chained.ChainedOptimizer`, so Lightning's automatic optimization
    and a single schedule apply. Members may not carry their own schedule.
    """

    def __init__(self, specs: Sequence[OptimizerSpec | Mapping[str, Any]], *, schedule: Any = None,
                 name: str | None = None) -> None:
        if isinstance(specs, Mapping) or not isinstance(specs, Sequence) or len(specs) < 2:
            raise SpecError("chain", specs, "list two or more optimizer specs", problem="is not a list of >= 2 specs")
        self.specs = []
        for i, member in enumerate(specs):
            try:
                self.specs.append(OptimizerSpec.from_dict(member))
            except SpecError as err:  # name the member: chain[1].betas
                raise SpecError(f"chain[{i}].{err.field}" if err.field else f"chain[{i}]", err.value, err.fix,
                                problem=err.problem) from None
        if name is not None and (not isinstance(name, str) or not name):
            raise SpecError("name", name, "give a non-empty string", problem="is not a valid name")
        for i, spec in enumerate(self.specs):
            if spec.schedule is not None:
                raise SpecError(f"chain[{i}].schedule", spec.schedule.to_dict(), "move the schedule to the chain: "
                                "ChainSpec(..., schedule=...) drives every member", problem="is set on a member")
        self.schedule = parse_schedule(schedule)
        self.name = name

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChainSpec:
        """Build from ``{"chain": [...], "schedule": ..., "name": ...}`` (unknown keys are a SpecError)."""
        data = check_keys("", data, allowed=("chain", "schedule", "name"))
        return cls(data.pop("chain"), **data)

    @property
    def label(self) -> str:
        """Display name: ``name`` if set, else 'Chained'."""
        return self.name or "Chained"

    def to_dict(self) -> dict[str, Any]:
        """The dict form: ``{"chain": [...], "schedule": ..., "name": ...}``."""
        out: dict[str, Any] = {"chain": [s.to_dict() for s in self.specs]}
        if self.schedule is not None:
            out["schedule"] = self.schedule.to_dict()
        if self.name:
            out["name"] = self.name
        return out


def _dry_run(cls: type, kwargs: dict[str, Any], where: str, candidates: Sequence[str] | None = None
             ) -> dict[str, Any] | None:
    """Construct ``cls`` on a tiny parameter so its own argument checks run now, before training.

    Returns the optimizer's ``defaults`` (the keys it honours per group), or None when the check is
    inconclusive here (an error about devices: the real parameters may live elsewhere). A rejection is
    a SpecError naming the argument among ``candidates`` (default: all but ``lr``) that the message
    names and without which construction works; failing that, one of either kind.
    """

    def construct(args: dict[str, Any]) -> torch.optim.Optimizer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls([torch.nn.Parameter(torch.zeros(2, 2))], **args)

    try:
        return dict(construct(kwargs).defaults)
    except SpecError as err:  # a kit optimizer's own check: keep its field, problem and fix
        field_name = f"{where}.{err.field}" if where else err.field
        problem = f"{err.problem or 'is invalid'} (checked by {cls.__name__})"
        raise SpecError(field_name, err.value, err.fix, problem=problem) from None
    except Exception as err:  # noqa: BLE001 - whatever the constructor raises, the spec is what is wrong
        message = str(err)
        if any(word in message.lower() for word in ("cuda", "cpu", "device")):
            return None
        pool = [k for k in (kwargs if candidates is None else candidates) if k != "lr"]
        named = [k for k in pool if k in message or k.rstrip("s") in message]

        def works_without(key: str) -> bool:
            try:
                construct({k: v for k, v in kwargs.items() if k != key})
            except Exception:  # noqa: BLE001
                return False
            return True

        fixing = [k for k in pool if works_without(k)]
        blamed = [k for k in named if k in fixing] or fixing or named
        blamed.sort(key=len, reverse=True)
        field_name = (f"{where}.{blamed[0]}" if where else blamed[0]) if blamed else (where or "optimizer")
        value = kwargs[blamed[0]] if blamed else kwargs
        raise SpecError(field_name, value, f"give a value {cls.__name__} accepts",
                        problem=f"is rejected by {cls.__name__} ({type(err).__name__}: {message})") from None


def _check_no_decay(no_decay: Any) -> str | list[Any] | None:
    """``"auto"``, None, or the list of selectors (one selector is made a list of one)."""
    if isinstance(no_decay, str) and no_decay == "auto" or no_decay is None:
        return no_decay
    if isinstance(no_decay, (list, tuple)):
        selectors = list(no_decay)
    elif isinstance(no_decay, (str, Mapping)) or inspect.isclass(no_decay) or callable(no_decay):
        selectors = [no_decay]
    else:
        raise SpecError("no_decay", no_decay, "give 'auto', null (decay everything) or a list of parameter "
                        "patterns such as ['*.bias', 'type:torch.nn.LayerNorm']", problem="is not a no-decay rule")
    check_selector("no_decay", selectors)
    return selectors


def _check_layer_decay(layer_decay: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if layer_decay is None:
        return None
    if not isinstance(layer_decay, Mapping):
        raise SpecError("layer_decay", layer_decay, "give {'rate': 0.75, 'depth': 're:blocks\\.(\\d+)\\.'}",
                        problem="is not a mapping")
    unknown = set(layer_decay) - {"rate", "depth"}
    if unknown:
        raise SpecError(f"layer_decay.{sorted(unknown)[0]}", layer_decay[sorted(unknown)[0]],
                        "layer_decay takes only 'rate' and 'depth'", problem="is not a layer_decay key")
    rate = number("layer_decay.rate", layer_decay.get("rate"), positive=True, at_most=1.0,
                  fix="give a rate in (0, 1]: deeper layers keep more of the lr")
    depth = layer_decay.get("depth")
    if not isinstance(depth, str) or not depth.startswith("re:"):
        raise SpecError("layer_decay.depth", depth, "give a regex with one capture group for the block index, "
                        "e.g. 're:blocks\\.(\\d+)\\.'", problem="is not a 're:' pattern")
    try:
        compiled = re.compile(depth[3:])
    except re.error as err:
        raise SpecError("layer_decay.depth", depth, f"fix the regex ({err})", problem="is not a valid regex") from None
    if compiled.groups != 1:
        raise SpecError("layer_decay.depth", depth, "use exactly one capture group around the block index",
                        problem=f"has {compiled.groups} capture groups")
    return {"rate": rate, "depth": depth}


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last).

    Keys brought in by a merge (``<<: *base``) may still be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise SpecError("spec YAML", key, "keep one of the two: YAML would silently use the last one",
                                problem=f"is a key given twice in one mapping (lines {first} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path_or_text: str | Path) -> Any:
    """Read YAML from a file path or from text; a key given twice in one mapping is a SpecError."""
    text = str(path_or_text)
    candidate = Path(text)
    if "\n" not in text and candidate.suffix in (".yaml", ".yml"):
        if not candidate.exists():
            raise SpecError("spec file", text, "check the path", problem="does not exist")
        text = candidate.read_text()
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as err:
        raise SpecError("spec YAML", text[:60], f"fix the YAML syntax ({err})", problem="cannot be parsed") from None


AnySpec = OptimizerSpec | ChainSpec | list


def spec_from_data(data: Any) -> AnySpec:
    """Normalise anything the mixin accepts into OptimizerSpec, ChainSpec or a list of those."""
    if isinstance(data, (OptimizerSpec, ChainSpec)):
        return data
    if isinstance(data, Mapping):
        if "optim" in data and len(data) == 1:
            return spec_from_data(data["optim"])
        if "chain" in data:
            return ChainSpec.from_dict(data)
        return OptimizerSpec.from_dict(data)
    if isinstance(data, (list, tuple)):
        if not data:
            raise SpecError("spec", data, "list at least one optimizer", problem="is empty")
        specs = [spec_from_data(d) for d in data]
        if len(specs) == 1:
            return specs[0]
        return specs
    raise SpecError("spec", data, "give an OptimizerSpec, a dict, a list of those, or YAML", problem="is not a spec")


def spec_to_data(spec: Any) -> Any:
    """The plain-data form of a spec (for ``save_hyperparameters`` and YAML)."""
    if isinstance(spec, list):
        return [spec_to_data(s) for s in spec]
    return spec.to_dict()
