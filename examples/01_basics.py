"""Basics: learning rate, weight decay, momentum and lr decay, one OptimizerSpec each.

By hand: each setting is code in ``configure_optimizers``;
``weight_decay=`` on ``model.parameters()`` decays biases and LayerNorm weights too; and lr decay
exists only for Adagrad, the one torch optimizer with an ``lr_decay`` argument.

With the kit: one validated ``OptimizerSpec`` per setting. ``plan(model, spec)`` prints where
every parameter goes: biases and norm weights land in a ``no_decay`` group automatically. Adagrad's
``lr_decay`` works as in torch, and the ``inverse_time`` schedule gives the same decay,
``lr / (1 + lr_decay * step)``, to any optimizer.

Run: ``python examples/01_basics.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy

from lightning_optkit import OptimizerMixin, OptimizerSpec, plan
from lightning_optkit.demo import spirals


class SpiralNet(OptimizerMixin, L.LightningModule):
    """A small MLP on 2-D spirals; its optimizer comes from ``self.optim_spec``."""

    def __init__(self, spec: OptimizerSpec) -> None:
        super().__init__()
        self.optim_spec = spec
        self.body = nn.Sequential(nn.Linear(2, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 3)
        self.val_acc = MulticlassAccuracy(num_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)


def fit(spec: OptimizerSpec, epochs: int = 10) -> tuple[SpiralNet, L.Trainer]:
    """Train a fresh SpiralNet (same seed, same data order every time) and return it with its trainer."""
    L.seed_everything(0, verbose=False)
    train, val = random_split(spirals(n_per_class=200), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    model = SpiralNet(spec)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
    return model, trainer


def report(title: str, trainer: L.Trainer) -> None:
    lrs = {g["name"]: round(g["lr"], 5) for g in trainer.optimizers[0].param_groups}
    print(f"{title:<28} val_acc={trainer.callback_metrics['val_acc']:.3f}  final lr per group: {lrs}")


def main() -> None:
    # 1. Learning rate: the one required number.
    report("lr (SGD)", fit(OptimizerSpec("sgd", lr=0.3))[1])

    # 2. Weight decay: biases and LayerNorm weights are exempt (no_decay="auto"); the plan shows it.
    adamw = OptimizerSpec("adamw", lr=1e-2, weight_decay=0.05)
    print(plan(SpiralNet(adamw), adamw))
    report("weight decay (AdamW)", fit(adamw)[1])

    # 3. Momentum (with Nesterov): an SGD keyword, checked against torch.optim.SGD's signature.
    report("momentum (SGD, nesterov)", fit(OptimizerSpec("sgd", lr=0.1, momentum=0.9, nesterov=True))[1])

    # 4. Lr decay: Adagrad's own lr_decay, and the inverse_time schedule doing the same for any optimizer.
    own, trainer = fit(OptimizerSpec("adagrad", lr=0.1, lr_decay=0.01))
    report("Adagrad(lr_decay=0.01)", trainer)
    scheduled, trainer = fit(OptimizerSpec("adagrad", lr=0.1, schedule={"name": "inverse_time", "lr_decay": 0.01}))
    report("Adagrad + inverse_time", trainer)
    diff = max((a - b).abs().max().item() for a, b in zip(own.parameters(), scheduled.parameters()))
    print(f"Adagrad lr_decay vs inverse_time schedule: max parameter difference {diff:.1e} (same decay)")
    sgd = OptimizerSpec("sgd", lr=0.1, momentum=0.9, schedule={"name": "inverse_time", "lr_decay": 0.01})
    report("SGD + inverse_time", fit(sgd)[1])


if __name__ == "__main__":
    main()
