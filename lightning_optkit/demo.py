"""``optkit demo``: a small classifier trained from a spec with two named groups and a schedule."""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit.mixin import OptimizerMixin
from lightning_optkit.params import plan
from lightning_optkit.spec import OptimizerSpec, ParamGroup


def spirals(n_per_class: int = 400, classes: int = 3, noise: float = 0.15, seed: int = 0) -> TensorDataset:
    """Interleaved 2-D spirals, one arm per class (generated, nothing downloaded)."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(classes):
        t = torch.linspace(0.0, 1.0, n_per_class)
        angle = t * 2.5 * math.pi + 2 * math.pi * c / classes
        radius = t * 2.0
        points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
        xs.append(points + noise * torch.randn(points.shape, generator=gen))
        ys.append(torch.full((n_per_class,), c))
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def demo_spec() -> OptimizerSpec:
    """AdamW with a 'backbone' and a 'head' group (the head learns 5x faster) and warmup-cosine."""
    return OptimizerSpec(
        "adamw",
        lr=1e-2,
        weight_decay=0.05,
        groups=[ParamGroup("backbone.*", name="backbone"), ParamGroup("head.*", name="head", lr_scale=5.0)],
        schedule={"name": "cosine", "warmup": "10%", "min_lr_ratio": 0.05},
    )


class SpiralClassifier(OptimizerMixin, L.LightningModule):
    """An MLP backbone and a linear head; validation accuracy measured with torchmetrics."""

    def __init__(self, hidden: int = 64, classes: int = 3, optim: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optim is None:
            self.optim_spec = demo_spec()
        self.backbone = nn.Sequential(
            nn.Linear(2, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
        )
        self.head = nn.Linear(hidden, classes)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for 2-D points."""
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on a batch (the mixin's optimizer steps it)."""
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Validation loss and torchmetrics accuracy."""
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)


def demo_callbacks() -> list[L.Callback]:
    """The kit callbacks the demo registers (those that are installed in this version)."""
    callbacks: list[L.Callback] = []
    try:
        from lightning_optkit.callbacks import GradientClipping, OptimizerMonitor
    except ImportError:
        return callbacks
    callbacks += [GradientClipping(max_norm=1.0), OptimizerMonitor(every_n_steps=10)]
    return callbacks


def sync_command(run_dir: Path) -> str:
    """The exact ``wandb sync`` command for an offline run, runnable from any folder: absolute paths, and the
    ``wandb`` executable of this environment (the shell's PATH may not have the venv's ``bin``)."""
    executable = Path(sys.executable).parent / "wandb"
    wandb_cmd = str(executable) if executable.exists() else "wandb"
    return f"{shlex.quote(wandb_cmd)} sync {shlex.quote(str(run_dir))}"


def run_demo(max_epochs: int = 8, wandb: bool = True, save_dir: str | os.PathLike = "runs/demo") -> dict[str, float]:
    """Train the spiral classifier; print the plan, the final metrics and where the run was written."""
    L.seed_everything(0, verbose=False)
    save_dir = Path(save_dir).resolve()  # absolute, so every printed path works from any folder
    save_dir.mkdir(parents=True, exist_ok=True)
    data = spirals()
    train, val = torch.utils.data.random_split(data, [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    model = SpiralClassifier()
    print(plan(model, model.optim_spec))
    if wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger: Any = WandbLogger(project="lightning_optkit-demo", save_dir=str(save_dir), offline=True)
    else:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(str(save_dir))
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=10,
        callbacks=demo_callbacks(), default_root_dir=str(save_dir), enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    acc, loss = metrics.get("val_acc", float("nan")), metrics.get("val_loss", float("nan"))
    print(f"final: val_acc={acc:.3f} val_loss={loss:.3f}")
    if wandb:
        import wandb as wandb_lib

        run_dir = Path(logger.experiment.dir).parent.resolve()
        wandb_lib.finish()
        print(f"W&B run (offline) written to {run_dir}")
        print(f"upload it later with: {sync_command(run_dir)}")
    else:
        print(f"CSV metrics written to {Path(logger.log_dir).resolve()}")
    return metrics
