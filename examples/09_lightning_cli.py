"""LightningCLI: the optimizer, its groups, the schedule and the callbacks, all from one YAML file.

By hand, the optimizer lives in ``configure_optimizers`` code, so trying another lr, another
schedule or a per-module group means editing Python, and the config file the CLI saves does not say
which optimizer ran.

With the kit: the model takes ``optim: dict | None`` and calls ``save_hyperparameters()``; the mixin
reads ``self.hparams["optim"]``, so the spec comes from ``09_config.yaml`` (or ``--model.optim.lr=...``
on the command line), is saved in every checkpoint, and is validated before the first batch.
Callbacks (clipping, NaN guard) are configured in the same file with ``class_path``.

Run: ``python examples/09_lightning_cli.py`` (defaults to ``fit --config 09_config.yaml``), or pass
any LightningCLI arguments, e.g. ``fit --config examples/09_config.yaml --model.optim.lr=3e-3``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy

from lightning_optkit import OptimizerMixin
from lightning_optkit.demo import spirals
from lightning_optkit.extras import require_in_script


class SpiralClassifier(OptimizerMixin, L.LightningModule):
    """An MLP body and a linear head; the optimizer spec is the ``optim`` hyperparameter."""

    def __init__(self, hidden: int = 64, optim: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()  # hparams["optim"] is what the mixin builds from
        self.body = nn.Sequential(nn.Linear(2, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                  nn.GELU())
        self.head = nn.Linear(hidden, 3)
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


class SpiralData(L.LightningDataModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train, self.val = random_split(spirals(n_per_class=200), [0.8, 0.2],
                                            generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


def main(args: list[str] | None = None) -> None:
    require_in_script("cli", "examples/09_lightning_cli.py (LightningCLI)")  # one line if jsonargparse is missing
    args = args or ["fit", "--config", str(Path(__file__).with_name("09_config.yaml"))]
    cli = LightningCLI(SpiralClassifier, SpiralData, args=args, save_config_callback=None)
    trainer = cli.trainer
    print(f"optim from the config: {cli.model.hparams['optim']}")
    print(f"trainer callbacks (GradientClipping and NonFiniteGuard from the config): "
          f"{[type(c).__name__ for c in trainer.callbacks]}")
    groups = {g["name"]: f"{g['lr']:.2e}" for g in trainer.optimizers[0].param_groups}
    print(f"{type(trainer.optimizers[0]).__name__} groups, lr after the schedule: {groups}")
    print(f"val_acc={trainer.callback_metrics['val_acc']:.3f} after {trainer.global_step} steps")


if __name__ == "__main__":
    main(sys.argv[1:])
