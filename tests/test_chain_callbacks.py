"""A ChainSpec (hybrid Muon: torch's Muon for 2-D hidden weights, AdamW for the rest) with all three gradient
callbacks, through real fits: group labels unique across members, norms and skips over the whole chain."""

from __future__ import annotations

import csv
import logging
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from test_chain_and_schedulefree import HYBRID_MUON as HYBRID  # the README recipe: muon + adamw, cosine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit import OptimizerMixin, build_optimizers
from lightning_optkit.callbacks import GradientClipping, NonFiniteGuard, OptimizerMonitor
from lightning_optkit.callbacks.naming import group_labels
from lightning_optkit.optim import ChainedOptimizer

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")

class TinyLM(OptimizerMixin, L.LightningModule):
    """Embedding, two hidden matrices, a LayerNorm and a head."""

    def __init__(self, optim: dict, nan_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(20, 16)
        self.blocks = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, 20)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits = self.head(self.blocks(self.embed(tokens[:, :-1])))
        return nn.functional.cross_entropy(logits.reshape(-1, 20), tokens[:, 1:].reshape(-1))

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.nan_at:
            self.blocks[0].weight.grad[0, 0] = math.nan  # a Muon member's gradient


class Recorder(Callback):
    """Pre-clip gradients (float64), parameters before and after, and each group's lr, per step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({
            "grads": [p.grad.double().clone() for p in pl_module.parameters()],
            "before": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "lr": [g["lr"] for g in optimizer.param_groups],
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _fit(tmp_path, quiet_trainer_kwargs, model: TinyLM, steps: int = 4) -> tuple[Recorder, list[dict]]:
    recorder = Recorder()
    logger = CSVLogger(str(tmp_path), name="chain")
    data = DataLoader(TensorDataset(torch.randint(0, 20, (8 * steps, 9))), batch_size=8)
    trainer = L.Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_epochs=1, log_every_n_steps=1,
                        callbacks=[recorder, OptimizerMonitor(), GradientClipping(0.5), NonFiniteGuard()])
    trainer.fit(model, data)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return recorder, [r for r in rows if "grad_norm/total" in r]


def test_hybrid_muon_with_monitor_clipping_and_guard_logs_per_member_groups(tmp_path, quiet_trainer_kwargs):
    recorder, rows = _fit(tmp_path, quiet_trainer_kwargs, TinyLM(HYBRID))
    assert len(rows) == len(recorder.steps) == 4
    for row, step in zip(rows, recorder.steps):
        # each member's group under its own key, with the lr that step used; no bare group name collides
        assert row["lr/Muon/default"] == pytest.approx(step["lr"][0], rel=1e-12)
        assert row["lr/AdamW/default"] == pytest.approx(step["lr"][1], rel=1e-12)
        assert not any(k.startswith("lr/default") for k in row)
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in step["grads"]))
        assert row["grad_norm/total"] == pytest.approx(total, rel=1e-5)  # float32 norms vs float64
        assert row["grad_clip/clip_coef"] == pytest.approx(min(1.0, 0.5 / (total + 1e-6)), rel=1e-5)
        assert row["guard/skipped_steps"] == 0.0
        changed = [n for n in step["before"] if not torch.equal(step["before"][n], step["after"][n])]
        if step["lr"][0] > 0:  # after the warmup's first (zero-lr) step: both members stepped
            assert "blocks.0.weight" in changed and "head.weight" in changed


def test_guard_skips_the_whole_chain_and_names_the_member_group(tmp_path, quiet_trainer_kwargs, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_optkit.callbacks.guard"):
        recorder, rows = _fit(tmp_path, quiet_trainer_kwargs, TinyLM(HYBRID, nan_at=1))
    skipped = recorder.steps[1]
    for name, before in skipped["before"].items():  # neither Muon's nor AdamW's parameters moved
        assert torch.equal(before, skipped["after"][name]), name
    assert [r["guard/skipped_steps"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert all(math.isfinite(v) for v in recorder.steps[-1]["after"]["blocks.0.weight"].flatten().tolist())
    lines = [r.getMessage() for r in caplog.records]
    assert any("non-finite gradients in blocks.0.weight (group Muon/default)" in line for line in lines), lines


def test_group_labels_of_chains_built_from_specs_and_by_hand():
    model = TinyLM(HYBRID)
    two_adamw = {"chain": [{"optimizer": "adamw", "lr": 1e-3, "params": "blocks.*"},
                           {"optimizer": "adamw", "lr": 1e-3}]}
    assert group_labels(build_optimizers(model, two_adamw)) == ["AdamW/default", "AdamW-1/default"]
    by_hand = ChainedOptimizer([torch.optim.SGD(model.blocks.parameters(), lr=0.1),
                                torch.optim.SGD([{"params": model.head.parameters(), "name": "head"},
                                                 {"params": model.embed.parameters()}], lr=0.1)])
    assert group_labels(by_hand) == ["SGD/pg0", "SGD-1/head", "SGD-1/pg1"]
    assert group_labels(torch.optim.SGD(model.parameters(), lr=0.1)) == ["pg0"]  # not a chain: unchanged
