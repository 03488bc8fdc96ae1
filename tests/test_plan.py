"""The plan: which parameter lands in which group with which lr and weight decay, checked exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_optkit import ChainSpec, OptimizerSpec, ParamGroup, build_optimizers, plan
from lightning_optkit.spec import spec_from_data, spec_to_data


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.rms = nn.RMSNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim, bias=False)


class Toy(nn.Module):
    """Embedding, position embedding, blocks, a BatchNorm/GroupNorm stem and a head."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, 4, dim))
        self.stem_bn = nn.BatchNorm1d(dim)
        self.stem_gn = nn.GroupNorm(2, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def groups_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        g["name"]: {"params": sorted(names[id(p)] for p in g["params"]), "lr": g["lr"],
                    "weight_decay": g["weight_decay"]}
        for g in optimizer.param_groups
    }


def test_auto_no_decay_exempts_biases_1d_norms_and_no_weight_decay_but_not_embeddings() -> None:
    model = Toy()
    opt = build_optimizers(model, OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1))
    got = groups_of(opt, model)
    decayed = {"embed.weight", "head.weight"} | {f"blocks.{i}.{n}.weight" for i in range(3) for n in ("fc", "proj")}
    assert got["default"] == {"params": sorted(decayed), "lr": 1e-3, "weight_decay": 0.1}
    all_names = {n for n, _ in model.named_parameters()}
    assert got["default/no_decay"] == {"params": sorted(all_names - decayed), "lr": 1e-3, "weight_decay": 0.0}
    assert "pos_embed" in got["default/no_decay"]["params"]  # 3-D, exempt only through no_weight_decay()
    assert set(got) == {"default", "default/no_decay"}


def test_no_decay_list_and_none() -> None:
    model = Toy()
    opt = build_optimizers(model, OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1, no_decay=["embed.*", "head.bias"]))
    assert groups_of(opt, model)["default/no_decay"]["params"] == ["embed.weight", "head.bias"]
    opt = build_optimizers(model, OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1, no_decay=None))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1]


def test_groups_first_match_wins_with_lr_scale_lr_and_options() -> None:
    model = Toy()
    spec = OptimizerSpec(
        "sgd", lr=0.1, momentum=0.9, weight_decay=0.01,
        groups=[
            ParamGroup("head.*", name="head", lr=0.5, momentum=0.5),
            ParamGroup(nn.LayerNorm, name="norms", lr_scale=0.1, weight_decay=0.0),
            ParamGroup(["blocks.0.*", "re:^blocks\\.1\\."], name="early", lr_scale=0.5),
        ],
    )
    opt = build_optimizers(model, spec)
    got = groups_of(opt, model)
    assert got["head"] == {"params": ["head.weight"], "lr": 0.5, "weight_decay": 0.01}
    assert got["head/no_decay"] == {"params": ["head.bias"], "lr": 0.5, "weight_decay": 0.0}
    assert got["norms"]["params"] == sorted(f"blocks.{i}.norm.{w}" for i in range(3) for w in ("weight", "bias"))
    assert got["norms"]["lr"] == pytest.approx(0.01) and got["norms"]["weight_decay"] == 0.0
    assert got["early"]["params"] == sorted(f"blocks.{i}.{n}.weight" for i in (0, 1) for n in ("fc", "proj"))
    assert got["early"]["lr"] == pytest.approx(0.05)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["head"]["momentum"] == 0.5 and by_name["early"]["momentum"] == 0.9
    assert "blocks.2.fc.weight" in got["default"]["params"]
    # every parameter exactly once
    flat = [n for g in got.values() for n in g["params"]]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())


def test_layer_decay_gives_each_depth_its_rate_power() -> None:
    model = Toy(depth=3)
    layer_decay = {"rate": 0.5, "depth": "re:blocks\\.(\\d+)\\."}
    spec = OptimizerSpec("adamw", lr=1.0, weight_decay=0.05, layer_decay=layer_decay)
    rows = {r.param: r for r in plan(model, spec)}
    # stem (before the first block): depth 0 -> 0.5**4; block i -> depth i+1; head (after the last) -> depth 4
    assert rows["embed.weight"].lr == pytest.approx(0.5 ** 4)
    assert rows["stem_bn.weight"].lr == pytest.approx(0.5 ** 4)
    for i in range(3):
        assert rows[f"blocks.{i}.fc.weight"].lr == pytest.approx(0.5 ** (3 - i))
    assert rows["head.weight"].lr == pytest.approx(1.0)
    assert rows["head.bias"].weight_decay == 0.0 and rows["head.weight"].weight_decay == 0.05
    assert rows["blocks.1.fc.weight"].group == "default/layer2"


def test_several_optimizers_partition_and_catch_all_takes_the_rest() -> None:
    model = Toy()
    spec = [OptimizerSpec("adam", lr=1e-3, params="head.*", name="head_opt"), OptimizerSpec("sgd", lr=0.1)]
    result = build_optimizers(model, spec)
    assert isinstance(result, list) and len(result) == 2
    head_opt, rest = result[0]["optimizer"], result[1]["optimizer"]
    assert isinstance(head_opt, torch.optim.Adam) and isinstance(rest, torch.optim.SGD)
    head_names = {n for g in groups_of(head_opt, model).values() for n in g["params"]}
    rest_names = {n for g in groups_of(rest, model).values() for n in g["params"]}
    assert head_names == {"head.weight", "head.bias"}
    assert head_names | rest_names == {n for n, _ in model.named_parameters()} and not head_names & rest_names
    assert {r.optimizer for r in plan(model, spec)} == {"head_opt", "SGD"}


def test_plan_prints_a_table_with_every_parameter() -> None:
    model = Toy()
    text = str(plan(model, OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1)))
    assert text.splitlines()[0].split() == ["parameter", "optimizer", "group", "lr", "weight_decay", "shape", "numel"]
    for name, _ in model.named_parameters():
        assert name in text
    assert f"{sum(p.numel() for p in model.parameters()):,} values" in text


def test_dict_and_yaml_round_trip_build_the_same_groups() -> None:
    model = Toy()
    spec = OptimizerSpec("adamw", lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95),
                         groups=[ParamGroup(nn.LayerNorm, name="norms", lr_scale=0.5)],
                         schedule={"class": "torch.optim.lr_scheduler.StepLR", "step_size": 3, "gamma": 0.5})
    data = spec_to_data(spec)
    again = spec_from_data(data)
    a = build_optimizers(model, spec)
    b = build_optimizers(model, again)
    assert groups_of(a["optimizer"], model) == groups_of(b["optimizer"], model)
    assert a["lr_scheduler"]["interval"] == "epoch" and b["lr_scheduler"]["scheduler"].step_size == 3
    import yaml

    from_yaml = OptimizerSpec.from_yaml(yaml.safe_dump(data))
    assert groups_of(build_optimizers(model, from_yaml)["optimizer"], model) == groups_of(a["optimizer"], model)


def test_chain_spec_partitions_like_a_list() -> None:
    pytest.importorskip("lightning_optkit.optim.chained")
    model = Toy()
    chain = ChainSpec([OptimizerSpec("sgd", lr=0.1, params="head.*"), OptimizerSpec("adamw", lr=1e-3)])
    rows = plan(model, chain)
    assert {r.optimizer for r in rows if r.param.startswith("head.")} == {"SGD"}
    assert {r.optimizer for r in rows if not r.param.startswith("head.")} == {"AdamW"}


def test_no_weight_decay_of_a_wrapped_submodule_is_honoured() -> None:
    wrapper = nn.Module()
    wrapper.model = Toy()  # e.g. a LightningModule holding a timm model as self.model
    rows = {r.param: r for r in plan(wrapper, OptimizerSpec("adamw", lr=1e-3, weight_decay=0.05))}
    assert rows["model.pos_embed"].weight_decay == 0.0
    assert rows["model.embed.weight"].weight_decay == 0.05


def test_layer_decay_top_depth_does_not_depend_on_what_follows_the_last_block() -> None:
    model = Toy(depth=3)
    model.head.requires_grad_(False)  # nothing trainable after the last block
    spec = OptimizerSpec("adamw", lr=1.0, layer_decay={"rate": 0.5, "depth": "re:blocks\\.(\\d+)\\."})
    rows = {r.param: r for r in plan(model, spec)}
    assert rows["blocks.2.fc.weight"].lr == pytest.approx(0.5)  # depth 3 of max 4, as with a head
    assert rows["embed.weight"].lr == pytest.approx(0.5 ** 4)


class ScaleNorm2d(nn.Module):
    """A custom normalisation layer whose gain is 2-D ([C, 1]): shape alone does not say it is a norm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class Affine(nn.Module):
    """Declares itself a normalisation layer (a name that says nothing)."""

    is_norm_layer = True

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1))


class GatedNorm(ScaleNorm2d):
    """Its base says Norm; it opts out, so its 2-D gain is decayed."""

    is_norm_layer = False


class LayerNormLinear(nn.Module):
    """A fused norm + linear layer: the name does not end in Norm, its weight is a linear layer's."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels))


def test_auto_no_decay_recognises_norm_layers_by_kind_not_shape() -> None:
    model = nn.ModuleDict({"norm": ScaleNorm2d(4), "affine": Affine(4), "gated": GatedNorm(4),
                           "fused": LayerNormLinear(4), "proj": nn.Linear(4, 4, bias=False),
                           "sub": nn.Sequential(ScaleNorm2d(4))})
    got = groups_of(build_optimizers(model, OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1)), model)
    assert got["default/no_decay"]["params"] == ["affine.scale", "norm.gain", "sub.0.gain"]
    assert got["default"]["params"] == ["fused.weight", "gated.gain", "proj.weight"]
    assert got["default"]["weight_decay"] == 0.1 and got["default/no_decay"]["weight_decay"] == 0.0


def test_the_plan_shows_as_its_table_at_a_prompt_and_when_printed(capsys) -> None:
    """A Python prompt or notebook displays ``plan(model, spec)`` through its repr: the table, not a list dump."""
    import sys

    model = Toy()
    result = plan(model, OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1, groups=[ParamGroup("head.*", name="head")]))
    sys.__displayhook__(result)  # what the interactive interpreter does with an expression's value
    shown = capsys.readouterr().out
    print(result)
    printed = capsys.readouterr().out
    assert shown == printed
    lines = shown.splitlines()
    assert lines[0].split() == ["parameter", "optimizer", "group", "lr", "weight_decay", "shape", "numel"]
    head = next(line for line in lines if line.startswith("head.weight"))
    assert head.split()[:5] == ["head.weight", "AdamW", "head", "0.001", "0.1"]
    assert lines[-1].startswith(f"{len(result)} parameters") and "PlanRow(" not in shown
