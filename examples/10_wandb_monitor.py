"""Logging to Weights & Biases (offline by default) with OptimizerMonitor, then reading the run back.

By hand: learning rates come from LearningRateMonitor, gradient norms from a
``on_before_optimizer_step`` hook that calls ``.item()`` on every parameter every step (one host
sync each), and update norms are usually not logged at all.

With the kit: ``OptimizerMonitor(every_n_steps=...)`` logs, on the same step axis as ``self.log``,
each group's lr and weight decay, the total and per-layer gradient, parameter and update norms and the
update/parameter ratio, with one device-to-host transfer per logging step and none in between.
``lightning_optkit.wandb_history.read_history`` reads the logged rows back from the run's
``.wandb`` file, with no network and no account.

W&B runs offline unless ``WANDB_MODE`` says otherwise; the run is written under
``$OPTKIT_EXAMPLES_OUT`` (default: a new temporary folder), and ``wandb sync <run dir>`` uploads it.

Run: ``python examples/10_wandb_monitor.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import os
import tempfile

import lightning as L
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy

from lightning_optkit import OptimizerMixin, OptimizerSpec, ParamGroup
from lightning_optkit.callbacks import OptimizerMonitor
from lightning_optkit.demo import spirals
from lightning_optkit.wandb_history import find_run_dir, read_history


class SpiralNet(OptimizerMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.optim_spec = OptimizerSpec("adamw", lr=1e-2, weight_decay=0.05,
                                        groups=[ParamGroup("head.*", name="head", lr_scale=3.0)],
                                        schedule={"name": "cosine", "warmup": "10%"})
        self.body = nn.Sequential(nn.Linear(2, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 3)
        self.val_acc = MulticlassAccuracy(num_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    save_dir = os.environ.get("OPTKIT_EXAMPLES_OUT") or tempfile.mkdtemp(prefix="optkit-wandb-")
    L.seed_everything(0, verbose=False)
    train, val = random_split(spirals(n_per_class=200), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    logger = WandbLogger(project="optkit-examples", name="monitor", save_dir=save_dir)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=logger, log_every_n_steps=10,
                        callbacks=[OptimizerMonitor(every_n_steps=10)], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(SpiralNet(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
    wandb.finish()  # flush the run's .wandb file

    run_dir = find_run_dir(save_dir)
    print(f"W&B run ({os.environ['WANDB_MODE']}) written to {run_dir}; upload it with: wandb sync {run_dir}")
    rows = read_history(run_dir)
    monitored = [r for r in rows if "grad_norm/total" in r]
    prefixes = ("lr/", "weight_decay/", "momentum/", "grad_norm/", "param_norm/", "update_norm/", "update_ratio/")
    keys = sorted({k for r in monitored for k in r if k.startswith(prefixes)})
    print(f"{len(rows)} history rows; OptimizerMonitor logged {len(keys)} keys, e.g. {keys[:6]}")
    for row in monitored[::4]:
        print(f"  step {row['trainer/global_step']:>3}: lr/default={row['lr/default']:.2e} "
              f"lr/head={row['lr/head']:.2e} grad_norm/total={row['grad_norm/total']:.3f} "
              f"update_ratio/total={row['update_ratio/total']:.2e}")
    final = [r["val_acc"] for r in rows if "val_acc" in r]
    print(f"val_acc read back from the run: {[round(v, 3) for v in final]}")


if __name__ == "__main__":
    main()
