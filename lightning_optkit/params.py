"""Which parameter goes to which optimizer and group, with what lr and weight decay: :func:`plan`.

Matching rules: a glob on the qualified parameter name, ``re:<regex>`` (searched), ``type:<dotted>``
or a module class (the module's own parameters), a predicate ``(name, param) -> bool``, or a list of
those. A selector sees every name a parameter has (a tied weight's, a module registered twice, with
torch.compile's ``_orig_mod.`` stripped: see :mod:`lightning_optkit.param_names`); plans show the first.
A parameter takes the first group that matches, in declaration order; the rest fall into the
``default`` group. Patterns that match nothing (with the reason: frozen, taken by another optimizer or
an earlier group, a compiled prefix), overlaps between optimizers and parameters no optimizer takes are
errors, listed by name.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_optkit.errors import SpecError
from lightning_optkit.labels import unique_labels
from lightning_optkit.param_names import ParamNames, clean_name, named_parameters, param_names, why_no_match
from lightning_optkit.spec import ChainSpec, OptimizerSpec, resolve_module_type
from lightning_optkit.spec_set import SpecSet, normalise_spec

DEFAULT_GROUP = "default"

# Parameters of these layers are never decayed under no_decay="auto" (subclasses included).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
# A class name ending in Norm, optionally with a dimension: ScaleNorm, ScaleNorm2d, timm's LayerNorm2d,
# FrozenBatchNorm2d; not Normal, Normalize, or a fused LayerNormLinear (whose weight is a linear layer's).
_NORM_NAME = re.compile(r"Norm(\d+d?)?$")


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer, recognised by kind rather than by parameter shape.

    A module's own ``is_norm_layer`` attribute (True or False) decides when it declares one; otherwise
    a subclass of one of torch's norm layers, or a class whose name, or a base class's name, ends in
    ``Norm`` or ``Norm<k>d`` (``ScaleNorm2d``, timm's ``LayerNorm2d``, ``FrozenBatchNorm2d``).
    """
    declared = getattr(type(module), "is_norm_layer", None)
    if isinstance(declared, bool):
        return declared
    if isinstance(module, NORM_LAYERS):
        return True
    return any(_NORM_NAME.search(cls.__name__) for cls in type(module).__mro__ if cls not in (nn.Module, object))


@dataclass(frozen=True)
class PlanRow:
    """Where one parameter goes."""

    param: str
    optimizer: str
    group: str
    lr: float
    weight_decay: float
    shape: tuple[int, ...]
    numel: int


@dataclass
class TorchGroup:
    """One param group as handed to the optimizer's constructor."""

    name: str
    params: list[nn.Parameter]
    names: list[str]
    lr: float
    weight_decay: float
    options: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The dict torch optimizers take (``params``, ``name``, ``lr``, ``weight_decay`` and options)."""
        return {"params": self.params, "name": self.name, "lr": self.lr, "weight_decay": self.weight_decay,
                **self.options}


@dataclass
class OptimizerPlan:
    """The groups of one optimizer (or one member of a chain)."""

    spec: OptimizerSpec
    label: str
    groups: list[TorchGroup]


@dataclass(frozen=True)
class Plan(Sequence[PlanRow]):
    """Where every parameter goes: ``rows`` (one per parameter, in model order) and ``optimizers`` (the
    param groups each optimizer is built with), for the normalised ``specs``.

    A sequence of its rows. ``str`` and ``repr`` are the table, so ``plan(model, spec)`` typed at a
    Python prompt or as a notebook cell's last line shows it, as ``print(plan(model, spec))`` does.
    """

    rows: tuple[PlanRow, ...]
    optimizers: tuple[OptimizerPlan, ...]
    specs: SpecSet

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Any:
        return self.rows[index]

    def __iter__(self) -> Iterator[PlanRow]:
        return iter(self.rows)

    def __str__(self) -> str:
        return format_table(self.rows)

    __repr__ = __str__


def owners(module: nn.Module) -> dict[str, nn.Module]:
    """Map each name of each parameter (every alias, ``_orig_mod.`` stripped) to the module that owns it directly."""
    return param_names(module).owner


def matches(selector: Any, name: str, param: nn.Parameter, owner: nn.Module) -> bool:
    """Whether one parameter is selected by a selector (see the module docstring for the forms)."""
    if isinstance(selector, str):
        if selector.startswith("re:"):
            return re.search(selector[3:], name) is not None
        if selector.startswith("type:"):
            return isinstance(owner, resolve_module_type("params", selector[5:]))
        return fnmatch.fnmatchcase(name, selector)
    if inspect.isclass(selector):
        return isinstance(owner, selector)
    if isinstance(selector, (list, tuple)):
        return any(matches(s, name, param, owner) for s in selector)
    if isinstance(selector, Mapping):
        dims = selector.get("ndim")
        if dims is not None and param.ndim not in (dims if isinstance(dims, (list, tuple)) else [dims]):
            return False
        if "match" in selector and not matches(selector["match"], name, param, owner):
            return False
        return not ("exclude" in selector and matches(selector["exclude"], name, param, owner))
    return bool(selector(name, param))


def matched_name(selector: Any, param: nn.Parameter, names: ParamNames) -> str | None:
    """The first name of ``param`` that ``selector`` matches (None: no name does)."""
    return next((n for n in names.of(param) if matches(selector, n, param, names.owner[n])), None)


def selects(selector: Any, param: nn.Parameter, names: ParamNames) -> bool:
    """Whether ``selector`` matches any name of ``param`` (all its aliases, ``_orig_mod.`` stripped)."""
    return matched_name(selector, param, names) is not None


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named parameters that require grad (frozen ones are left out; tied weights appear once, by their first
    name; ``_orig_mod.`` stripped)."""
    return [(n, p) for n, p in named_parameters(module) if p.requires_grad]


def _no_match(field: str, selector: Any, names: ParamNames, *, frozen: Sequence[nn.Parameter] = (),
              elsewhere: Sequence[tuple[nn.Parameter, str]] = (), problem: str, fix: str) -> SpecError:
    """The SpecError for a selector that matched nothing, with the reason when one is known."""
    problem, fix = why_no_match(selector, names, lambda p: matched_name(selector, p, names), frozen=frozen,
                                elsewhere=elsewhere, default=(problem, fix))
    return SpecError(field, _describe(selector), fix, problem=problem)


def _describe(selector: Any) -> Any:
    """A selector as shown in error messages: itself for strings and lists, a name for classes and callables."""
    if inspect.isclass(selector):
        return f"type:{selector.__qualname__}"
    if isinstance(selector, (str, list, tuple, Mapping)):
        return selector
    return getattr(selector, "__name__", repr(selector))


def _names(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def listed_no_weight_decay(module: nn.Module) -> set[str]:
    """Names (or globs) returned by ``no_weight_decay()`` of the module and of every submodule, as qualified
    names: a LightningModule wrapping a timm model sees ``model.pos_embed``, not ``pos_embed`` (``_orig_mod.``
    stripped, as in every planned name)."""
    listed: set[str] = set()
    for prefix, sub in module.named_modules():
        method = getattr(sub, "no_weight_decay", None)
        if callable(method):
            listed |= {clean_name(f"{prefix}.{name}" if prefix else name) for name in method()}
    return listed


def no_decay_names(module: nn.Module, spec: OptimizerSpec, candidates: Sequence[tuple[str, nn.Parameter]],
                   names: ParamNames, frozen: Sequence[nn.Parameter] = (),
                   elsewhere: Sequence[tuple[nn.Parameter, str]] = ()) -> set[str]:
    """Names among ``candidates`` that get weight_decay 0 under ``spec.no_decay`` (any of a parameter's names;
    ``frozen`` and ``elsewhere`` explain a listed pattern that matches none of them)."""
    if spec.no_decay is None:
        return set()
    if spec.no_decay == "auto":
        listed = listed_no_weight_decay(module)
        out = set()
        for name, param in candidates:
            if param.ndim <= 1 or any(
                    alias.endswith(".bias") or alias == "bias" or is_norm_layer(names.owner[alias])
                    or any(alias == x or fnmatch.fnmatchcase(alias, x) for x in listed) for alias in names.of(param)):
                out.add(name)
        return out
    out = set()
    for i, pattern in enumerate(spec.no_decay):
        hits = {n for n, p in candidates if selects(pattern, p, names)}
        if not hits:
            raise _no_match(f"no_decay[{i}]", pattern, names, frozen=frozen, elsewhere=elsewhere,
                            problem="matches no parameter",
                            fix="check the name against `optkit plan` output or lightning_optkit.plan(model, spec)")
        out |= hits
    return out


def layer_depths(names: Sequence[str], rule: dict[str, Any]) -> tuple[dict[str, int], int]:
    """Depth of every parameter and the maximum depth (number of blocks + 1).

    Block index + 1 inside blocks, 0 before the first block, the maximum after the last. The maximum
    does not depend on whether anything follows the last block (a frozen head keeps the last block at
    ``rate ** 1``).
    """
    regex = re.compile(rule["depth"][3:])
    block: dict[str, int] = {}
    for name in names:
        m = regex.search(name)
        if m:
            try:
                block[name] = int(m.group(1))
            except ValueError:
                raise SpecError("layer_decay.depth", rule["depth"], "capture only the digits of the block index",
                                problem=f"captured {m.group(1)!r} from {name!r}") from None
    indices = sorted(set(block.values()))
    if len(indices) < 1:
        raise SpecError("layer_decay.depth", rule["depth"], "check the pattern against the parameter names "
                        "(`optkit plan`)", problem="matches no parameter")
    rank = {idx: i + 1 for i, idx in enumerate(indices)}
    max_depth = len(indices) + 1
    first = next(i for i, n in enumerate(names) if n in block)
    last = max(i for i, n in enumerate(names) if n in block)
    depths = {}
    for i, name in enumerate(names):
        if name in block:
            depths[name] = rank[block[name]]
        elif i < first:
            depths[name] = 0
        elif i > last:
            depths[name] = max_depth
        else:
            depths[name] = 0  # between blocks but outside them: treat like the stem
    if len(set(depths.values())) < 2:
        raise SpecError("layer_decay.depth", rule["depth"], "layer decay needs at least two depths; check the "
                        "pattern", problem="finds fewer than two depths")
    return depths, max_depth


def _candidates(module: nn.Module, specs: list[OptimizerSpec], field: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters to plan: the trainable ones, or every one when the specs say ``frozen="include"``."""
    modes = [s.frozen for s in specs]
    if len(set(modes)) > 1:
        i = modes.index("include" if modes[0] == "skip" else "skip")
        raise SpecError(f"{field}[{i}].frozen", modes[i], f"set frozen={modes[0]!r} on every optimizer: the "
                        "overlap and leftover rules need one set of parameters", problem=f"differs from "
                        f"{field}[0].frozen={modes[0]!r}")
    if modes[0] == "include":
        params = named_parameters(module)
        if not params:
            raise SpecError("params", None, "give the model parameters", problem="the model has no parameter")
        return params
    params = trainable(module)
    if not params:
        raise SpecError("params", None, "unfreeze some parameters (requires_grad=True), or set frozen='include' "
                        "to plan the frozen ones", problem="no trainable parameter in the model")
    return params


def _aliased(param: nn.Parameter, name: str, selector: Any, names: ParamNames) -> str:
    """``name``, or the alias ``selector`` matched with the name it is tied to (``head.weight (tied to ...)``)."""
    return names.described(param, matched_name(selector, param, names) or name)


def _frozen(module: nn.Module, planned: Sequence[tuple[str, nn.Parameter]]) -> list[nn.Parameter]:
    """The parameters of ``module`` left out of ``planned`` (the frozen ones, under frozen='skip')."""
    ids = {id(p) for _, p in planned}
    return [p for p in module.parameters() if id(p) not in ids]


def _assign_to_specs(module: nn.Module, specs: list[OptimizerSpec], field: str,
                     names: ParamNames) -> list[list[tuple[str, nn.Parameter]]]:
    params = _candidates(module, specs, field)
    frozen = _frozen(module, params)
    include = specs[0].frozen == "include"
    which = "parameter" if include else "trainable parameter"
    planned = "planned (frozen='include')" if include else "trainable"
    escape = "set frozen='skip'" if include else "freeze them (requires_grad=False)"
    if len(specs) == 1:
        spec = specs[0]
        if spec.params is None:
            return [params]
        picked = [(n, p) for n, p in params if selects(spec.params, p, names)]
        if not picked:
            raise _no_match(f"{field}.params", spec.params, names, frozen=frozen, problem=f"matches no {which}",
                            fix="check it against the parameter names (`optkit plan`)")
        taken_ids = {id(p) for _, p in picked}
        rest = [n for n, p in params if id(p) not in taken_ids]
        if rest:
            raise SpecError("params", _names(rest), f"drop params= to optimize every {which}, add them to the "
                            f"pattern, or {escape}",
                            problem=f"are {planned} but outside params={_describe(spec.params)!r}, so no optimizer "
                            "would update them")
        return [picked]
    catch_all = [i for i, s in enumerate(specs) if s.params is None]
    if len(catch_all) > 1:
        raise SpecError(f"{field}[{catch_all[1]}].params", None, "give every optimizer but one a params= selector "
                        "(the one without takes the rest)", problem="is missing on several optimizers")
    taken: dict[str, int] = {}
    picked_by: list[list[tuple[str, nn.Parameter]]] = [[] for _ in specs]
    for i, spec in enumerate(specs):
        if spec.params is None:
            continue
        hits = [(n, p) for n, p in params if selects(spec.params, p, names)]
        if not hits:
            raise _no_match(f"{field}[{i}].params", spec.params, names, frozen=frozen, problem=f"matches no {which}",
                            fix="check it against the parameter names (`optkit plan`)")
        overlap = [(n, p) for n, p in hits if n in taken]
        if overlap:
            other = taken[overlap[0][0]]
            raise SpecError(
                f"{field}[{i}].params", _describe(spec.params),
                f"give each parameter to exactly one optimizer: narrow optimizer {other}'s params so it excludes "
                f"these (e.g. a list of patterns, or leave one optimizer's params unset to take the rest)",
                problem=f"overlaps optimizer {other} ({specs[other].label}) on "
                f"{_names(_aliased(p, n, spec.params, names) for n, p in overlap)}; each would be updated twice per "
                "step",
            )
        for n, _ in hits:
            taken[n] = i
        picked_by[i] = hits
    rest = [(n, p) for n, p in params if n not in taken]
    if catch_all:
        picked_by[catch_all[0]] = rest
    elif rest:
        raise SpecError("params", _names(n for n, _ in rest), "add them to an optimizer's params, leave "
                        f"one optimizer's params unset to take the rest, or {escape}",
                        problem=f"are {planned} parameters that no optimizer takes")
    return picked_by


def _plan_one(module: nn.Module, spec: OptimizerSpec, params: list[tuple[str, nn.Parameter]], names: ParamNames,
              label: str, frozen: Sequence[nn.Parameter] = (),
              elsewhere: Sequence[tuple[nn.Parameter, str]] = ()) -> OptimizerPlan:
    """The groups of one optimizer over its ``params``; ``frozen`` and ``elsewhere`` (the parameters other
    optimizers take, with their labels) only explain a group pattern that matches none of ``params``."""
    by_group: dict[str, list[tuple[str, nn.Parameter]]] = {}
    group_of: dict[str, Any] = {}
    remaining = dict(params)
    for i, group in enumerate(spec.groups):
        gname = group.name or f"group{i}"
        if gname == DEFAULT_GROUP:
            raise SpecError(f"groups[{i}].name", gname, "pick another name: 'default' holds unmatched parameters",
                            problem="is reserved")
        all_hits = [(n, p) for n, p in params if selects(group.params, p, names)]
        hits = [n for n, _ in all_hits if n in remaining]
        if not all_hits:
            raise _no_match(f"groups[{gname}].params", group.params, names, frozen=frozen, elsewhere=elsewhere,
                            problem="matches no parameter of this optimizer",
                            fix="check the pattern against the parameter names (`optkit plan`)")
        if not hits:
            shadowed = _names(_aliased(p, n, group.params, names) for n, p in all_hits)
            raise SpecError(f"groups[{gname}].params", _describe(group.params), "reorder the groups or narrow the "
                            "earlier pattern: a parameter takes the first group that matches",
                            problem=f"matches only parameters already taken by earlier groups: {shadowed}")
        by_group[gname] = [(n, remaining.pop(n)) for n in hits]
        group_of[gname] = group
    if remaining:
        by_group[DEFAULT_GROUP] = list(remaining.items())
        group_of[DEFAULT_GROUP] = None
    decay_off = no_decay_names(module, spec, params, names, frozen, elsewhere)
    depths, max_depth = layer_depths([n for n, _ in params], spec.layer_decay) if spec.layer_decay else ({}, 0)
    groups: dict[tuple[str, bool, int], TorchGroup] = {}
    for gname, members in by_group.items():
        cfg = group_of[gname]
        base_lr = spec.lr
        wd = spec.weight_decay
        options: dict[str, Any] = {}
        if cfg is not None:
            if cfg.lr is not None:
                base_lr = cfg.lr
            elif cfg.lr_scale is not None:
                base_lr = spec.lr * cfg.lr_scale
            if cfg.weight_decay is not None:
                wd = cfg.weight_decay
                if wd > 0 and all(n in decay_off for n, _ in members):
                    raise SpecError(f"groups[{gname}].weight_decay", wd, "set no_decay=None (or a list that excludes "
                                    "these) to decay them, or drop weight_decay from the group",
                                    problem="would be ignored: no_decay='auto' exempts every parameter of the group")
            options = dict(cfg.options)
        for n, p in members:
            off = n in decay_off and wd > 0  # with wd == 0 decayed and exempt params share a group
            depth = depths.get(n, 0)
            key = (gname, off, depth)
            if key not in groups:
                parts = [gname]
                if spec.layer_decay:
                    parts.append(f"layer{depth}")
                if off:
                    parts.append("no_decay")
                lr = base_lr * (spec.layer_decay["rate"] ** (max_depth - depth) if spec.layer_decay else 1.0)
                groups[key] = TorchGroup("/".join(parts), [], [], lr, 0.0 if off else wd, options)
            groups[key].params.append(p)
            groups[key].names.append(n)
    return OptimizerPlan(spec, label, list(groups.values()))


def optimizer_labels(specs: Sequence[OptimizerSpec | ChainSpec]) -> list[str]:
    """Display names of the optimizers, made unique (:func:`~lightning_optkit.labels.unique_labels`:
    repeated class names get -1, -2); a name= is kept as given, so a repeated one is a SpecError."""
    out = unique_labels([s.label for s in specs])
    if any(s.name and label != s.label for s, label in zip(specs, out)):
        raise SpecError("name", out, "give every optimizer a unique name=", problem="repeats")
    return out


def plan(module: nn.Module, spec: Any) -> Plan:
    """Assign every trainable parameter of ``module`` to an optimizer and group; rows print as a table.

    With ``frozen="include"`` on the spec(s), frozen parameters are assigned too, by the same rules.

    ``spec`` is an OptimizerSpec, a ChainSpec, a list of specs, their dict/YAML data, or a SpecSet.
    """
    specs = normalise_spec(spec)
    names = param_names(module)
    members = list(specs.members)
    labels = optimizer_labels(members)
    assigned = _assign_to_specs(module, members, specs.field, names)
    order = {n: i for i, (n, _) in enumerate(named_parameters(module))}
    frozen = _frozen(module, [pair for params in assigned for pair in params])
    optimizers, rows = [], []
    for i, (s, label, params) in enumerate(zip(members, labels, assigned)):
        elsewhere = [(p, other) for j, (other, taken) in enumerate(zip(labels, assigned)) if j != i for _, p in taken]
        try:
            op = _plan_one(module, s, params, names, label, frozen, elsewhere)
        except SpecError as err:
            if specs.kind != "chain":
                raise
            raise SpecError(f"chain[{i}].{err.field}", err.value, err.fix, problem=err.problem) from None  # the member
        optimizers.append(op)
        rows += [PlanRow(n, label, g.name, g.lr, g.weight_decay, tuple(p.shape), p.numel())
                 for g in op.groups for n, p in zip(g.names, g.params)]
    rows.sort(key=lambda row: order[row.param])  # rows in model order
    return Plan(tuple(rows), tuple(optimizers), specs)


def format_table(rows: Sequence[PlanRow]) -> str:
    """Rows as an aligned text table with a per-group summary line count at the end."""
    header = ("parameter", "optimizer", "group", "lr", "weight_decay", "shape", "numel")
    body = [(r.param, r.optimizer, r.group, f"{r.lr:.4g}", f"{r.weight_decay:.4g}",
             "x".join(map(str, r.shape)) or "scalar", f"{r.numel:,}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    total = sum(r.numel for r in rows)
    groups = len({(r.optimizer, r.group) for r in rows})
    out.append(f"{len(rows)} parameters ({total:,} values) in {groups} groups")
    return "\n".join(out)
