"""Specs that need more than one torch optimizer object: hybrid Muon under one schedule, and schedule-free."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit import ChainSpec, OptimizerMixin, OptimizerSpec, plan
from lightning_optkit.callbacks import ScheduleFreeMode
from lightning_optkit.optim import ChainedOptimizer, ScheduleFreeAdamW


class TinyLM(OptimizerMixin, L.LightningModule):
    """Embedding, two hidden blocks and a head: the hybrid-Muon layout."""

    def __init__(self, optim: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(20, 16)
        self.blocks = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, 20)
        self.lrs: list[tuple[float, ...]] = []

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.blocks(self.embed(tokens[:, :-1])))
        return nn.functional.cross_entropy(logits.reshape(-1, 20), tokens[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        return self.loss(batch[0])

    def on_train_batch_start(self, batch, batch_idx):
        self.lrs.append(tuple(g["lr"] for g in self.trainer.optimizers[0].param_groups))


def hidden_matrices(name: str, param: torch.Tensor) -> bool:
    """2-D weights inside the blocks: Muon's share."""
    return name.startswith("blocks.") and param.ndim == 2


# The documented pattern: Muon takes the 2-D hidden matrices, AdamW takes the rest (embedding, head, 1-D).
HYBRID_MUON = {
    "chain": [
        {"optimizer": "muon", "lr": 0.02, "weight_decay": 0.01, "params": {"match": "blocks.*", "ndim": 2},
         "adjust_lr_fn": "match_rms_adamw"},
        {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.01},
    ],
    "schedule": {"name": "cosine", "warmup": 2, "min_lr_ratio": 0.1},
}


def test_hybrid_muon_partition_routes_hidden_matrices_to_muon() -> None:
    model = TinyLM()
    rows = plan(model, HYBRID_MUON)
    muon = {r.param for r in rows if r.optimizer == "Muon"}
    assert muon == {"blocks.0.weight", "blocks.3.weight"}
    assert {r.param for r in rows if r.optimizer == "AdamW"} == {n for n, _ in model.named_parameters()} - muon
    python_form = ChainSpec([OptimizerSpec("muon", lr=0.02, params=hidden_matrices), OptimizerSpec("adamw", lr=3e-3)])
    assert {r.param for r in plan(model, python_form) if r.optimizer == "Muon"} == muon


def test_hybrid_muon_trains_under_one_schedule(quiet_trainer_kwargs) -> None:
    model = TinyLM(optim=HYBRID_MUON)
    tokens = torch.randint(0, 20, (64, 9))
    tokens[:, 1::2] = (tokens[:, 0::2][:, : tokens[:, 1::2].shape[1]] + 1) % 20  # learnable next-token rule
    data = DataLoader(TensorDataset(tokens), batch_size=16)
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=15, log_every_n_steps=1)
    with torch.no_grad():
        first = model.loss(tokens).item()
    trainer.fit(model, data)
    (chained,) = trainer.optimizers
    assert isinstance(chained, ChainedOptimizer) and model.automatic_optimization
    assert [type(o).__name__ for o in chained.optimizers] == ["Muon", "AdamW"]
    with torch.no_grad():
        last = model.loss(tokens).item()
    assert last < 0.8 * first
    # one schedule drives both members: every group's lr is its base times the same multiplier
    bases = (0.02, 1e-2, 1e-2)  # Muon's group, AdamW's decayed and no-decay groups
    mult = [lrs[0] / bases[0] for lrs in model.lrs]
    for lrs, m in zip(model.lrs, mult):
        assert lrs == pytest.approx(tuple(b * m for b in bases), rel=1e-9)
    assert mult[0] == pytest.approx(0.0) and max(mult) == pytest.approx(1.0)
    assert min(mult[2:]) >= 0.1 - 1e-9


def test_schedulefree_spec_registers_schedulefree_mode(quiet_trainer_kwargs) -> None:
    class Reg(OptimizerMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)
            self.optim_spec = OptimizerSpec("schedulefree_adamw", lr=1e-2)
            self.modes: list[bool] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.layer(x), y)

        def validation_step(self, batch, batch_idx):
            self.modes.append(self.trainer.optimizers[0].param_groups[0]["train_mode"])

    model = Reg()
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=8)
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(model, data, data)
    assert any(isinstance(c, ScheduleFreeMode) for c in trainer.callbacks)
    assert isinstance(trainer.optimizers[0], ScheduleFreeAdamW)
    assert model.modes and not any(model.modes)  # validation always ran on the averaged weights
