"""Every invalid spec fails with a SpecError that names the field, shows the bad value and says the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_optkit import ChainSpec, OptimizerSpec, ParamGroup, SpecError, build_optimizers, plan


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)


# (description, spec factory, substrings the message must contain)
SPEC_ONLY = [
    ("negative lr", lambda: OptimizerSpec("sgd", lr=-0.1), ["lr=-0.1", "> 0"]),
    ("zero lr", lambda: OptimizerSpec("sgd", lr=0), ["lr=0", "> 0"]),
    ("nan lr", lambda: OptimizerSpec("sgd", lr=float("nan")), ["lr=nan", "finite"]),
    ("inf lr", lambda: OptimizerSpec("adam", lr=float("inf")), ["lr=inf", "finite"]),
    ("non-numeric lr", lambda: OptimizerSpec("sgd", lr="fast"), ["lr='fast'", "number"]),
    ("bool lr", lambda: OptimizerSpec("sgd", lr=True), ["lr=True", "number"]),
    ("None lr", lambda: OptimizerSpec("sgd", lr=None), ["lr=None", "number"]),
    ("negative weight decay", lambda: OptimizerSpec("adamw", lr=1e-3, weight_decay=-1), ["weight_decay=-1", ">= 0"]),
    ("unknown optimizer", lambda: OptimizerSpec("adamm", lr=1e-3), ["optimizer='adamm'", "'adam'"]),
    ("unknown dotted path", lambda: OptimizerSpec("torch.optim.AdamX", lr=1e-3), ["torch.optim.AdamX", "path"]),
    ("not an optimizer class", lambda: OptimizerSpec(nn.Linear, lr=1e-3), ["Optimizer subclass"]),
    ("SGD has no lr_decay", lambda: OptimizerSpec("sgd", lr=0.01, lr_decay=0.001),
     ["lr_decay=0.001", "adagrad", "inverse_time"]),
    ("typo in keyword", lambda: OptimizerSpec("sgd", lr=0.01, momentun=0.9), ["momentun", "'momentum'"]),
    ("betas on SGD", lambda: OptimizerSpec("sgd", lr=0.01, betas=(0.9, 0.99)), ["betas", "momentum"]),
    ("lr and lr_scale", lambda: ParamGroup("fc1.*", lr=0.1, lr_scale=2.0), ["lr", "lr_scale", "not both"]),
    ("group weight decay negative", lambda: ParamGroup("fc1.*", weight_decay=-0.1), ["weight_decay=-0.1"]),
    ("bad regex", lambda: ParamGroup("re:blocks.(", name="b"), ["re:blocks.(", "regex"]),
    ("empty selector", lambda: ParamGroup("", name="b"), ["params=''", "empty"]),
    ("selector of wrong type", lambda: ParamGroup(3.5, name="b"), ["params=3.5", "selector"]),
    ("mapping selector with an unknown key", lambda: ParamGroup({"match": "fc1.*", "dim": 2}, name="b"),
     ["'dim'", "ndim"]),
    ("mapping selector with a bad ndim", lambda: ParamGroup({"ndim": "two"}, name="b"), ["ndim='two'"]),
    ("type: that is no module", lambda: ParamGroup("type:torch.optim.SGD", name="b"), ["type:torch.optim.SGD"]),
    ("duplicate group names", lambda: OptimizerSpec("sgd", lr=0.1, groups=[ParamGroup("fc1.*", name="a"),
                                                                          ParamGroup("fc2.*", name="a")]),
     ["'a'", "unique"]),
    ("weight decay on an optimizer without it", lambda: OptimizerSpec("lbfgs", lr=1, weight_decay=0.1),
     ["weight_decay=0.1", "LBFGS"]),
    ("layer decay rate above 1",
     lambda: OptimizerSpec("adamw", lr=1e-3, layer_decay={"rate": 1.5, "depth": "re:(\\d)"}),
     ["layer_decay.rate=1.5"]),
    ("layer decay without capture group", lambda: OptimizerSpec(
        "adamw", lr=1e-3, layer_decay={"rate": 0.5, "depth": "re:blocks"}), ["layer_decay.depth", "capture group"]),
    ("unknown scheduler class", lambda: OptimizerSpec(
        "sgd", lr=0.1, schedule={"class": "torch.optim.lr_scheduler.StepLRR", "step_size": 2}), ["StepLRR", "StepLR"]),
    ("scheduler typo keyword", lambda: OptimizerSpec(
        "sgd", lr=0.1, schedule={"class": "torch.optim.lr_scheduler.StepLR", "step_sise": 2}),
     ["step_sise", "step_size"]),
    ("scheduler missing argument", lambda: OptimizerSpec(
        "sgd", lr=0.1, schedule={"class": "torch.optim.lr_scheduler.StepLR"}), ["step_size", "missing"]),
    ("interval batch", lambda: OptimizerSpec(
        "sgd", lr=0.1, schedule={"class": "torch.optim.lr_scheduler.StepLR", "step_size": 2, "interval": "batch"}),
     ["interval='batch'", "'step'"]),
    ("plateau without monitor", lambda: OptimizerSpec(
        "sgd", lr=0.1, schedule={"class": "torch.optim.lr_scheduler.ReduceLROnPlateau"}), ["monitor", "val_loss"]),
    ("monitor on a scheduler that ignores it", lambda: OptimizerSpec(
        "sgd", lr=0.1, schedule={"class": "torch.optim.lr_scheduler.StepLR", "step_size": 2, "monitor": "val_loss"}),
     ["monitor='val_loss'", "ignored"]),
    ("OneCycleLR per epoch", lambda: OptimizerSpec(
        "sgd", lr=0.1, schedule={"class": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.1, "total_steps": 10}),
     ["interval='epoch'", "step"]),
    ("betas rejected by the optimizer itself", lambda: OptimizerSpec("adamw", lr=1e-3, betas=(0.9, 1.5)),
     ["betas=(0.9, 1.5)", "rejected by AdamW", "Invalid beta"]),
    ("Adagrad's own lr_decay check", lambda: OptimizerSpec("adagrad", lr=1e-3, lr_decay=-1),
     ["lr_decay=-1", "Adagrad"]),
    ("fused together with foreach", lambda: OptimizerSpec("adamw", lr=1e-3, fused=True, foreach=True),
     ["foreach=True", "`fused` and `foreach` cannot"]),
    ("bad per-group option value", lambda: OptimizerSpec(
        "adamw", lr=1e-3, groups=[ParamGroup("fc1.*", name="g", betas=(0.9, 2.0))]), ["groups[g].betas"]),
    ("constructor-only option given per group", lambda: OptimizerSpec(
        "fused_adamw", lr=1e-3, groups=[ParamGroup("fc1.*", name="g", max_grad_norm=1.0)]),
     ["groups[g].max_grad_norm=1.0", "ignored per group", "OptimizerSpec"]),
    ("dict without optimizer", lambda: OptimizerSpec.from_dict({"lr": 0.1}), ["optimizer", "missing"]),
    ("YAML string that is no number", lambda: OptimizerSpec.from_yaml("optimizer: adam\nlr: 1e-3x\n"), ["1e-3x"]),
    ("chain of one", lambda: ChainSpec([{"optimizer": "sgd", "lr": 0.1}]), ["chain", ">= 2"]),
]


@pytest.mark.parametrize("make, needles", [(m, n) for _, m, n in SPEC_ONLY], ids=[d for d, _, _ in SPEC_ONLY])
def test_invalid_spec_fails_with_actionable_message(make, needles) -> None:
    with pytest.raises(SpecError) as info:
        make()
    message = str(info.value)
    assert "Fix:" in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


NEEDS_MODEL = [
    ("group pattern matches nothing", OptimizerSpec("sgd", lr=0.1, groups=[ParamGroup("backbon.*", name="bb")]),
     ["groups[bb].params", "backbon.*", "matches no parameter"]),
    ("group shadowed by an earlier group", OptimizerSpec(
        "sgd", lr=0.1, groups=[ParamGroup("*", name="all"), ParamGroup("fc1.*", name="late")]),
     ["groups[late]", "already taken"]),
    ("no_decay pattern matches nothing", OptimizerSpec("adamw", lr=0.1, no_decay=["*.gamma"]),
     ["no_decay[0]", "*.gamma"]),
    ("tutorial overlap: all params to SGD and fc2 to Adam as well",
     [OptimizerSpec("sgd", lr=0.1, params="*"), OptimizerSpec("adam", lr=1e-3, params="fc2.*")],
     ["fc2.weight", "fc2.bias", "overlaps", "twice"]),
    ("leftovers", [OptimizerSpec("sgd", lr=0.1, params="fc1.*"), OptimizerSpec("adam", lr=1e-3, params="fc2.*")],
     ["backbone.0.weight", "no optimizer takes"]),
    ("one optimizer whose params leave others out", OptimizerSpec("sgd", lr=0.1, params="fc*"),
     ["backbone.0.weight", "outside params='fc*'", "drop params="]),
    ("two catch-all optimizers", [OptimizerSpec("sgd", lr=0.1), OptimizerSpec("adam", lr=1e-3)],
     ["params", "the rest"]),
    ("weight decay on a group that no_decay exempts entirely", OptimizerSpec(
        "adamw", lr=0.1, groups=[ParamGroup("*.bias", name="biases", weight_decay=0.1)]),
     ["groups[biases].weight_decay=0.1", "ignored"]),
    ("layer decay pattern capturing a non-number", OptimizerSpec(
        "adamw", lr=0.1, layer_decay={"rate": 0.5, "depth": "re:^(\\w)"}), ["captured 'b'", "digits"]),
]


@pytest.mark.parametrize("spec, needles", [(s, n) for _, s, n in NEEDS_MODEL], ids=[d for d, _, _ in NEEDS_MODEL])
def test_invalid_assignment_fails_before_training(spec, needles) -> None:
    with pytest.raises(SpecError) as info:
        build_optimizers(Net(), spec)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_layer_decay_needs_two_depths() -> None:
    spec = OptimizerSpec("adamw", lr=0.1, layer_decay={"rate": 0.5, "depth": "re:^(\\d+)\\."})
    with pytest.raises(SpecError, match="fewer than two depths"):
        plan(nn.Sequential(nn.Linear(2, 2)), spec)


def test_yaml_numbers_written_as_strings_become_floats() -> None:
    spec = OptimizerSpec.from_yaml("optimizer: adamw\nlr: 1e-3\nweight_decay: 5e-2\neps: 1e-8\nbetas: [0.9, 0.95]\n")
    assert spec.lr == pytest.approx(1e-3) and isinstance(spec.lr, float)
    assert spec.optimizer_kwargs["eps"] == pytest.approx(1e-8) and isinstance(spec.optimizer_kwargs["eps"], float)
    assert spec.optimizer_kwargs["betas"] == (0.9, 0.95)
    optimizer = build_optimizers(Net(), spec)
    assert isinstance(optimizer.param_groups[0]["lr"], float)
    assert isinstance(optimizer.param_groups[0]["eps"], float)


def test_frozen_parameters_are_left_out_not_reported_as_leftovers() -> None:
    net = Net()
    net.backbone.requires_grad_(False)
    rows = plan(net, [OptimizerSpec("sgd", lr=0.1, params="fc1.*"), OptimizerSpec("adam", lr=1e-3, params="fc2.*")])
    assert {r.param for r in rows} == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_spec_error_is_a_value_error_with_structured_fields() -> None:
    with pytest.raises(ValueError) as info:
        OptimizerSpec("sgd", lr=-1.0)
    err = info.value
    assert isinstance(err, SpecError)
    assert (err.field, err.value) == ("lr", -1.0)
    assert torch.optim.SGD  # the registry still resolves torch classes after an error
