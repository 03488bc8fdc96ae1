"""Property: every spec is either accepted and trains, or a SpecError before the first batch naming the bad key.

Specs are generated from the spec's own schema: a valid base spec (an optimizer, maybe weight decay,
a named group with a per-group option, no_decay, layer decay, a kit or torch schedule, maybe as a
two-member chain), then one mutation at a key path taken from that schema (the spec's fields, the
optimizer's signature, the schedule's keywords, the torch scheduler's signature): a value of a wrong
type, arity or range, an unknown key near a real one, or a required key removed. Some specs travel
through YAML text. Each is built and fitted for two steps with a real Trainer. What must hold: the
fit finishes, or a SpecError is raised before the first training batch and its ``field`` names the
mutated key (its last key, under the right parent: ``groups[head].momentum``, ``schedule.gamma``,
``chain[1].betas``). Any other exception, or an error after the first batch, fails the test.

The example budget is fixed and the examples derandomized, so CI runs the same ~10 s every time.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit import OptimizerMixin, SpecError
from lightning_optkit.registry import optimizer_keywords, resolve_optimizer
from lightning_optkit.schedules.shapes import get_schedule_kind
from lightning_optkit.spec import TorchScheduleSpec, spec_from_data

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "nadam", "radam", "lbfgs", "sparseadam",
              "momentum_sgd", "lion", "lamb", "adan", "schedulefree_adamw")
KIT_SCHEDULES = {
    "cosine": {}, "linear": {}, "constant": {}, "polynomial": {"power": 2.0}, "wsd": {"decay": 0.5},
    "cosine_restarts": {"period": 2}, "inverse_sqrt": {}, "exponential": {"gamma": 0.9},
    "step": {"step_size": 1}, "multistep": {"milestones": [1]}, "inverse_time": {"lr_decay": 0.1},
    "onecycle": {"pct_start": 0.25}, "plateau": {"monitor": "train_loss", "patience": 0},
}
TORCH_SCHEDULES = [
    {"class": "StepLR", "step_size": 1, "interval": "step"},
    {"class": "torch.optim.lr_scheduler.ExponentialLR", "gamma": 0.9},
    {"class": "MultiStepLR", "milestones": [1, 2], "interval": "step"},
    {"class": "CosineAnnealingLR", "T_max": 4, "interval": "step"},
    {"class": "ReduceLROnPlateau", "monitor": "train_loss", "patience": 1},
]
SPEC_FIELDS = ("optimizer", "lr", "weight_decay", "params", "groups", "no_decay", "layer_decay", "schedule",
               "name", "frozen")
GROUP_FIELDS = ("params", "name", "lr", "lr_scale", "weight_decay")
KIT_SCHEDULE_FIELDS = ("name", "warmup", "total", "warmup_start_factor", "min_lr_ratio", "interval")
TORCH_SCHEDULE_FIELDS = ("class", "interval", "frequency", "monitor", "strict", "name")
# The fixed budget: the same examples on every run (derandomized), about 10 s on a laptop CPU. To search
# further by hand: OPTKIT_PROPERTY_EXAMPLES=5000 OPTKIT_PROPERTY_RANDOM=1 (new examples each run).
EXAMPLES = int(os.environ.get("OPTKIT_PROPERTY_EXAMPLES", 300))
RANDOM = bool(os.environ.get("OPTKIT_PROPERTY_RANDOM"))
BAD_VALUES = [None, True, False, 0, -1, 1, 3, 0.5, 1.5, -0.5, 10**400, -(10**400), 1e308, float("nan"),
              float("inf"), "", "x", "1e-3", "0.9", "auto", "5%", "2ep", "3steps", [], [0.9], [0.9, 0.99],
              [0.9, 0.99, 0.9], ["a", 1], {}, {"a": 1}]


class Model(OptimizerMixin, L.LightningModule):
    """Blocks (for layer decay), a LayerNorm (for no_decay) and a head (for the group)."""

    def __init__(self, optim: Any) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.optim_spec = optim

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.head(self.norm(self.blocks(x))), y)
        self.log("train_loss", loss)
        return loss


class FirstBatch(L.Callback):
    started = False

    def on_train_batch_start(self, *args: Any) -> None:
        self.started = True


def _base(draw: st.DrawFn, optimizer: str, member: int | None) -> dict[str, Any]:
    keywords = optimizer_keywords(resolve_optimizer(optimizer))
    spec: dict[str, Any] = {"optimizer": optimizer, "lr": draw(st.sampled_from([0.01, "1e-2", 1]))}
    if "weight_decay" in keywords and draw(st.booleans()):
        spec["weight_decay"] = 0.01
    if member is not None:  # a chain member: the first takes the blocks, the second the rest
        if member == 0:
            spec["params"] = "blocks.*"
        return spec
    single_group = optimizer == "lbfgs"  # LBFGS takes one param group only
    if not single_group and draw(st.booleans()):
        group: dict[str, Any] = {"params": "head.*", "name": "head", "lr_scale": 2.0}
        option = next((k for k in ("momentum", "betas", "eps", "alpha") if k in keywords), None)
        if option is not None and optimizer not in ("lbfgs", "sparseadam"):
            group[option] = keywords[option].default
        spec["groups"] = [group]
    if draw(st.booleans()):
        spec["no_decay"] = draw(st.sampled_from([["*.bias"], "auto", None, "type:torch.nn.LayerNorm"]))
    if not single_group and draw(st.booleans()):
        spec["layer_decay"] = {"rate": 0.5, "depth": "re:blocks\\.(\\d+)\\."}
    schedule = _schedule(draw)
    if schedule is not None:
        spec["schedule"] = schedule
    return spec


def _schedule(draw: st.DrawFn) -> dict[str, Any] | None:
    kind = draw(st.sampled_from(["none", "kit", "torch"]))
    if kind == "kit":
        name = draw(st.sampled_from(sorted(KIT_SCHEDULES)))
        schedule = {"name": name, **KIT_SCHEDULES[name]}
        if name not in ("onecycle",) and draw(st.booleans()):
            schedule["warmup"] = 1
        return schedule
    return copy.deepcopy(draw(st.sampled_from(TORCH_SCHEDULES))) if kind == "torch" else None


def _schedule_keys(schedule: dict[str, Any]) -> list[str]:
    if "class" in schedule:
        cls = TorchScheduleSpec.from_dict(schedule).cls
        params = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "optimizer")]
        return [*TORCH_SCHEDULE_FIELDS, *params]
    return [*KIT_SCHEDULE_FIELDS, *get_schedule_kind(schedule["name"]).params]


def _paths(spec: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Every key path the schema offers for this spec (existing keys and keys it could have)."""
    keywords = [k for k in optimizer_keywords(resolve_optimizer(spec["optimizer"])) if k not in ("lr",)]
    paths: list[tuple[Any, ...]] = [(k,) for k in (*SPEC_FIELDS, *keywords)]
    if "groups" in spec:
        paths += [("groups", 0, k) for k in (*GROUP_FIELDS, *keywords)]
    if "schedule" in spec:
        paths += [("schedule", k) for k in _schedule_keys(spec["schedule"])]
    if "layer_decay" in spec:
        paths += [("layer_decay", k) for k in ("rate", "depth")]
    return paths


def _typo(key: str, valid: list[str], draw: st.DrawFn) -> str | None:
    typo = draw(st.sampled_from([key + "s", key[:-1], key[0] + key, key.replace("_", "")]))
    return None if typo in valid or not typo else typo


@st.composite
def mutated_specs(draw: st.DrawFn) -> tuple[Any, list[tuple[Any, ...]], bool]:
    """(spec data, the key paths an error may name (none: the spec is valid), whether it goes through YAML)."""
    chain = draw(st.integers(0, 5)) == 0
    if chain:
        members = [_base(draw, draw(st.sampled_from(["sgd", "momentum_sgd", "lion"])), 0),
                   _base(draw, draw(st.sampled_from(["adam", "adamw", "lamb", "adan"])), 1)]
        data: dict[str, Any] = {"chain": members}
        schedule = _schedule(draw)
        if schedule is not None:
            data["schedule"] = schedule
        at = draw(st.integers(0, 1))
        inner_paths = [("chain", at, *p) for p in _paths(members[at]) if p[0] not in ("schedule", "groups")]
        outer = [("schedule", k) for k in _schedule_keys(schedule)] if schedule else []
        paths = inner_paths + outer + [("name",), ("schedule",)]
    else:
        data = _base(draw, draw(st.sampled_from(OPTIMIZERS)), None)
        paths = _paths(data)
    path = draw(st.sampled_from(paths))
    parent: Any = data
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["set", "set", "set", "unknown", "delete"]))
    blamed = [path]
    if action == "unknown":  # a misspelt key: the error may name it, or the key it should have been
        typo = _typo(path[-1], list(parent), draw)
        if typo is not None:
            parent[typo] = parent.get(path[-1], 1)
            parent.pop(path[-1], None)
            blamed.append((*path[:-1], typo))
        else:
            blamed = []
    elif action == "delete":
        if path[-1] in parent:
            del parent[path[-1]]
        else:
            blamed = []  # nothing was changed: the spec is still valid
    else:
        parent[path[-1]] = copy.deepcopy(draw(st.sampled_from(BAD_VALUES)))
    related = {"warmup": "total", "total": "warmup"}  # the warmup must be shorter than the total
    if path[-2:-1] == ("schedule",) and path[-1] in related:
        blamed += [(*path[:-1], related[path[-1]])]
    if chain and path[:1] == ("chain",):  # how members share the parameters: either member may be named
        blamed += [("chain", 1 - path[1], *p[2:]) for p in blamed]
    via_yaml = draw(st.booleans())
    return data, blamed, via_yaml


def _expected_prefix(path: tuple[Any, ...]) -> str:
    """The start of the field name a SpecError about ``path`` must have."""
    if path[0] == "chain":
        rest = path[2:]
        return f"chain[{path[1]}]." + (_expected_prefix(rest) if len(rest) > 1 else "")
    if path[0] == "groups" and len(path) > 1:
        return "groups["
    if path[0] in ("schedule", "layer_decay") and len(path) > 1:
        return path[0]
    return ""


def _field_names_path(field: str, path: tuple[Any, ...]) -> bool:
    last = str(path[-1])
    if not field.startswith(_expected_prefix(path)):
        return False
    # the mutated key itself (a schedule without its name or class: the schedule)
    return last in field or (path[-1] in ("class", "name") and field == "schedule")


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_specs())
def test_every_spec_trains_or_fails_before_the_first_batch_naming_its_key(tmp_path_factory, case) -> None:
    data, paths, via_yaml = case
    first = FirstBatch()
    try:
        spec = spec_from_data(yaml.safe_load(yaml.safe_dump(data))) if via_yaml else spec_from_data(data)
        loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 2)), batch_size=2)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[first],
                            default_root_dir=tmp_path_factory.mktemp("fit"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Model(spec), loader)
    except SpecError as err:
        event("SpecError")
        assert not first.started, f"SpecError after the first batch: {err}"
        uses_sparseadam = "sparseadam" in repr(data)
        assert any(_field_names_path(err.field, p) for p in paths) or (
            uses_sparseadam and err.field == "optimizer"), f"field {err.field!r} does not name {paths}: {err}"
        return
    event("trained")
    assert trainer.global_step >= 1, "the fit did not step"
