"""Selectors see every name a parameter has: tied weights, a module registered twice, torch.compile's
``_orig_mod.``; a compiled model plans as the uncompiled one; a selector matching nothing says why."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit import OptimizerMixin, SpecError, plan
from lightning_optkit.callbacks import GradientClipping, OptimizerMonitor

HEAD_LR = {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1,
           "groups": [{"name": "out", "params": "head.*", "lr": 1e-3}, {"name": "mix", "params": "shared.*"}]}


class TiedLM(OptimizerMixin, L.LightningModule):
    """The output layer shares the embedding's weight; ``shared`` is ``body`` under a second name."""

    def __init__(self, optim: dict = HEAD_LR, compile_body: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(12, 6)
        body = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.body = torch.compile(body, backend="eager") if compile_body else body
        self.shared = self.body
        self.head = nn.Linear(6, 12)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens)))

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        return nn.functional.cross_entropy(self(tokens[:, :-1]).reshape(-1, 12), tokens[:, 1:].reshape(-1))


def _rows(module: nn.Module, spec: dict) -> list[tuple]:
    return [(r.param, r.optimizer, r.group, r.lr, r.weight_decay, r.shape) for r in plan(module, spec)]


def test_tied_and_twice_registered_parameters_match_by_any_name() -> None:
    rows = {r.param: r for r in plan(TiedLM(), HEAD_LR)}
    assert set(rows) == {"embed.weight", "body.0.weight", "body.0.bias", "head.bias"}  # each parameter once
    assert rows["embed.weight"].group == "out" and rows["embed.weight"].lr == 1e-3  # as head.weight
    assert rows["body.0.weight"].group == "mix"  # as shared.0.weight


@pytest.mark.parametrize("where", ["submodule", "model"])
def test_compiled_models_plan_exactly_as_uncompiled(where) -> None:
    plain = TiedLM()
    if where == "submodule":
        compiled = TiedLM(compile_body=True)
        assert any("_orig_mod" in n for n, _ in compiled.named_parameters())
    else:
        compiled = torch.compile(TiedLM(), backend="eager")
    for spec in (HEAD_LR, {"chain": [{"optimizer": "sgd", "lr": 0.1, "params": {"match": "body.*", "ndim": 2}},
                                     {"optimizer": "adamw", "lr": 1e-2, "no_decay": ["body.0.bias"]}]}):
        assert _rows(compiled, spec) == _rows(plain, spec)


class Scaled(nn.Module):
    """A 2-D parameter exempt from weight decay only through ``no_weight_decay()``, as timm's ``pos_embed``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3, 3))

    def no_weight_decay(self) -> set[str]:
        return {"scale"}


def test_no_weight_decay_lists_of_compiled_submodules_apply() -> None:
    spec = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1}
    plain = nn.Sequential(Scaled())
    rows = _rows(plain, spec)
    assert [r[4] for r in rows if r[0] == "0.scale"] == [0.0]
    assert _rows(nn.Sequential(torch.compile(Scaled(), backend="eager")), spec) == rows
    assert _rows(torch.compile(plain, backend="eager"), spec) == rows


def test_fit_with_tied_weights_and_a_compiled_submodule(tmp_path, quiet_trainer_kwargs) -> None:
    model = TiedLM(compile_body=True)
    logger = CSVLogger(str(tmp_path), name="aliases")
    trainer = L.Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=3, log_every_n_steps=1,
                        callbacks=[OptimizerMonitor(), GradientClipping(1.0, exclude=["shared"])])
    before = model.embed.weight.detach().clone()
    trainer.fit(model, DataLoader(TensorDataset(torch.randint(0, 12, (12, 7))), batch_size=4))
    groups = {g["name"]: g["params"] for g in trainer.optimizers[0].param_groups}
    assert groups["out"] == [model.embed.weight] and groups["out/no_decay"] == [model.head.bias]  # tied: head.*
    assert groups["mix"] == [model.shared._orig_mod[0].weight]  # a compiled submodule, through its second name
    held = [p for ps in groups.values() for p in ps]
    assert len(held) == len({id(p) for p in held}) == 4  # the tied weight once
    assert not torch.equal(before, model.embed.weight)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        keys = set(next(csv.DictReader(f)))
    assert "grad_norm/layer/body.0" in keys and not any("_orig_mod" in k for k in keys)


@pytest.mark.parametrize("spec, field, problem", [
    ({"optimizer": "adamw", "lr": 1e-3, "params": "body.*"}, "spec.params", "matches only frozen parameters"),
    ({"optimizer": "adamw", "lr": 1e-3, "groups": [{"name": "b", "params": "body.*", "lr": 1e-4}]}, "groups[b].params",
     "matches only frozen parameters (requires_grad=False): body.0.weight, body.0.bias"),
    ({"optimizer": "adamw", "lr": 1e-3, "no_decay": ["shared.0.bias"]}, "no_decay[0]",
     "matches only frozen parameters (requires_grad=False): shared.0.bias (tied to body.0.bias)"),
    ({"optimizer": "adamw", "lr": 1e-3,
      "groups": [{"name": "e", "params": "embed.*"}, {"name": "h", "params": "head.weight"}]}, "groups[h].params",
     "already taken by earlier groups: head.weight (tied to embed.weight)"),
    ({"chain": [{"optimizer": "adamw", "lr": 1e-3, "params": "embed.*"},
                {"optimizer": "sgd", "lr": 0.1, "groups": [{"name": "h", "params": "head.weight"}]}]},
     "chain[1].groups[h].params", "another optimizer takes: head.weight (tied to embed.weight) in optimizer AdamW"),
    ({"optimizer": "adamw", "lr": 1e-3, "groups": [{"name": "c", "params": "_orig_mod.head.*"}]}, "groups[c].params",
     "torch.compile's '_orig_mod.' prefix"),
])
def test_a_selector_matching_nothing_says_why(spec, field, problem) -> None:
    model = TiedLM()
    model.body.requires_grad_(False)
    with pytest.raises(SpecError) as err:
        plan(model, spec)
    assert err.value.field == field and problem in err.value.problem, str(err.value)
