"""Progressive unfreezing: ``OptimizerSpec(frozen="include")`` plus the ``Unfreeze`` callback, on a real Trainer."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit import OptimizerMixin, OptimizerSpec, ParamGroup, build_optimizers, plan
from lightning_optkit.callbacks import Unfreeze
from lightning_optkit.errors import SpecError
from lightning_optkit.schedules import Schedule

SCHEDULE = {"name": "cosine", "min_lr_ratio": 0.1}
BATCHES = 3  # per epoch


def include_spec(**overrides) -> OptimizerSpec:
    """Plain SGD (no momentum) so every update has a closed form: p - lr * (grad + wd * p)."""
    kwargs = dict(lr=0.1, weight_decay=0.1, groups=[ParamGroup("backbone.*", name="backbone", lr=0.02)],
                  schedule=SCHEDULE, frozen="include")
    return OptimizerSpec(torch.optim.SGD, **{**kwargs, **overrides})


class Net(OptimizerMixin, L.LightningModule):
    """A frozen backbone (Linear + LayerNorm) and a trainable head, in float64."""

    def __init__(self, spec: OptimizerSpec | None = None) -> None:
        super().__init__()
        self.optim_spec = spec or include_spec()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 3)
        self.backbone.requires_grad_(False)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4 * BATCHES, 4, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (4 * BATCHES,), generator=g)), batch_size=4)


class Recorder(L.Callback):
    """Per optimizer step: params and grads before, params after, each param's group lr / weight decay."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.trainable_at_start: dict[str, bool] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainable_at_start = {n: p.requires_grad for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.steps.append({
            "step": trainer.global_step, "epoch": trainer.current_epoch,
            "before": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "grad": {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()},
            "lr": {n: group_of[id(p)]["lr"] for n, p in pl_module.named_parameters()},
            "wd": {n: group_of[id(p)]["weight_decay"] for n, p in pl_module.named_parameters()},
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_frozen_params_untouched_until_unfrozen_then_trained_with_planned_lr_decay_and_schedule(
        quiet_trainer_kwargs) -> None:
    model = Net()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = {r.param: r for r in plan(model, model.optim_spec)}
    assert set(rows) == set(initial)  # frozen parameters are planned too
    assert rows["backbone.0.weight"].lr == 0.02 and rows["backbone.0.weight"].weight_decay == 0.1
    assert rows["backbone.1.weight"].group == "backbone/no_decay" and rows["backbone.1.weight"].weight_decay == 0
    recorder = Recorder()
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=3, callbacks=[Unfreeze("backbone.*", at_epoch=1),
                                                                            recorder])
    trainer.fit(model, loader())
    total = 3 * BATCHES
    assert [s["step"] for s in recorder.steps] == list(range(total))
    mults = Schedule.from_dict(SCHEDULE).multipliers(total)
    backbone = [n for n in initial if n.startswith("backbone.")]
    for s in recorder.steps:
        if s["epoch"] < 1:
            for n in backbone:
                assert s["grad"][n] is None
                assert torch.equal(s["after"][n], initial[n]), f"frozen {n} changed at step {s['step']}"
        for n in (backbone if s["epoch"] >= 1 else []) + ["head.weight", "head.bias"]:
            lr = rows[n].lr * mults[s["step"]]
            assert s["lr"][n] == pytest.approx(lr, rel=1e-12), (n, s["step"])
            assert s["wd"][n] == rows[n].weight_decay
            expected = s["before"][n] - lr * (s["grad"][n] + rows[n].weight_decay * s["before"][n])
            torch.testing.assert_close(s["after"][n], expected, rtol=0, atol=1e-14)
    for n in backbone:
        assert not torch.equal(recorder.steps[-1]["after"][n], initial[n]), f"{n} never trained"
        assert model.get_parameter(n).requires_grad


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.SGD, "momentum_sgd", "lion", "lamb", "adan",
                                       "fused_adamw"])
def test_optimizers_skip_frozen_params_in_their_groups(optimizer) -> None:
    model = Net(OptimizerSpec(optimizer, lr=1e-2, weight_decay=0.1, frozen="include",
                              **({"momentum": 0.9} if optimizer is torch.optim.SGD else {})))
    opt = build_optimizers(model, model.optim_spec)
    frozen = dict(model.backbone.named_parameters())
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in frozen.values())
    initial = {n: p.detach().clone() for n, p in frozen.items()}
    x, y = next(iter(loader()))
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in frozen.items():
        assert torch.equal(p, initial[n]), f"{type(opt).__name__} changed frozen {n}"
        assert not opt.state.get(p), f"{type(opt).__name__} made state for frozen {n}"
    model.backbone.requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(p, initial[n]) for n, p in frozen.items())


def test_unfreeze_without_frozen_include_is_a_spec_error(quiet_trainer_kwargs) -> None:
    model = Net(include_spec(frozen="skip", groups=[]))
    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=2, callbacks=[Unfreeze("backbone.*", at_step=1)])
    with pytest.raises(SpecError, match="frozen: include") as err:
        trainer.fit(model, loader())
    assert "backbone.0.weight" in str(err.value)


def test_resume_past_the_unfreeze_point_keeps_params_trainable(quiet_trainer_kwargs, tmp_path) -> None:
    first = L.Trainer(**quiet_trainer_kwargs, max_steps=3, callbacks=[Unfreeze("backbone.*", at_step=2)])
    first.fit(Net(), loader())
    path = tmp_path / "unfrozen.ckpt"
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert saved["Unfreeze[params='backbone.*', at_step=2]"] == {"unfrozen": True}

    model, recorder = Net(), Recorder()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    second = L.Trainer(**quiet_trainer_kwargs, max_steps=5, callbacks=[Unfreeze("backbone.*", at_step=2), recorder])
    second.fit(model, loader(), ckpt_path=path)
    assert all(recorder.trainable_at_start[n] for n in recorder.trainable_at_start if n.startswith("backbone."))
    assert [s["step"] for s in recorder.steps] == [3, 4]
    for s in recorder.steps:
        for n in ("backbone.0.weight", "backbone.1.weight"):
            assert s["grad"][n] is not None and not torch.equal(s["after"][n], s["before"][n])


def test_unfreeze_validates_its_arguments_and_the_selection(quiet_trainer_kwargs) -> None:
    for kwargs in ({}, {"at_epoch": 1, "at_step": 1}, {"at_epoch": -1}, {"at_step": 1.5}, {"at_epoch": True}):
        with pytest.raises(SpecError, match="Unfreeze.at_"):
            Unfreeze("backbone.*", **kwargs)
    with pytest.raises(SpecError, match="Unfreeze.params"):
        Unfreeze("re:(", at_epoch=1)
    for selector, problem in (("encoder.*", "matches no parameter"), ("head.*", "matches only trainable")):
        trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=1, callbacks=[Unfreeze(selector, at_epoch=1)])
        with pytest.raises(SpecError, match=problem):
            trainer.fit(Net(), loader())


def test_frozen_field_is_validated_and_round_trips() -> None:
    with pytest.raises(SpecError, match="frozen"):
        OptimizerSpec("adamw", lr=1e-3, frozen="yes")
    spec = include_spec(schedule=None)
    assert spec.to_dict()["frozen"] == "include"
    assert OptimizerSpec.from_dict(spec.to_dict()).frozen == "include"
    assert "frozen" not in include_spec(frozen="skip").to_dict()
    loaded = OptimizerSpec.from_yaml("optimizer: adamw\nlr: 0.001\nfrozen: include\n")
    assert loaded.frozen == "include"


def test_several_optimizers_with_frozen_include_follow_the_overlap_and_leftover_rules() -> None:
    model = Net()
    head = OptimizerSpec("adamw", lr=1e-3, params="head.*", frozen="include")
    with pytest.raises(SpecError, match="backbone.1.weight"):  # a frozen LayerNorm is now a leftover
        plan(model, [head, OptimizerSpec("sgd", lr=1e-2, params="backbone.0.*", frozen="include")])
    with pytest.raises(SpecError, match="overlaps"):
        plan(model, [head, OptimizerSpec("sgd", lr=1e-2, params=["head.bias", "backbone.*"], frozen="include")])
    with pytest.raises(SpecError, match=r"optimizers\[1\].frozen"):
        plan(model, [head, OptimizerSpec("sgd", lr=1e-2, params="backbone.*")])
    rows = plan(model, [head, OptimizerSpec("sgd", lr=1e-2, frozen="include")])
    assert {r.param: r.optimizer for r in rows}["backbone.1.bias"] == "SGD"


@pytest.mark.slow
def test_unfreeze_is_refused_under_multi_process_ddp(tmp_path) -> None:
    script = tmp_path / "ddp_unfreeze.py"
    script.write_text(
        "import lightning as L, torch\n"
        "from torch import nn\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from lightning_optkit import OptimizerMixin, OptimizerSpec\n"
        "from lightning_optkit.callbacks import Unfreeze\n"
        "class M(OptimizerMixin, L.LightningModule):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.backbone, self.head = nn.Linear(2, 2), nn.Linear(2, 1)\n"
        "        self.backbone.requires_grad_(False)\n"
        "        self.optim_spec = OptimizerSpec('sgd', lr=0.1, frozen='include')\n"
        "    def training_step(self, batch, batch_idx):\n"
        "        return self.head(self.backbone(batch[0])).mean()\n"
        "if __name__ == '__main__':\n"
        "    t = L.Trainer(accelerator='cpu', strategy='ddp', devices=2, max_steps=2, logger=False,\n"
        "                  enable_checkpointing=False, enable_progress_bar=False,\n"
        "                  callbacks=[Unfreeze('backbone.*', at_epoch=1)])\n"
        "    t.fit(M(), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2))\n"
    )
    launch = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120, start_new_session=True)
    assert result.returncode != 0
    assert "cannot unfreeze parameters after DDP wrapped the model" in result.stderr
