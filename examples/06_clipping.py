"""Gradient clipping (global norm and AGC) and the NaN guard, with the logged norms printed.

What the tutorial did wrong: its loss was ``F.cross_entropy(logits, torch.rand(batch, classes))``.
Float targets are read as class *probabilities*, so the call runs without any error while the model
is trained towards random noise. Class targets must be integers: ``torch.randint(classes, (batch,))``.
And by hand, clipping is easy to put where it does nothing (after ``optimizer.step()``) or where it
is wrong (before AMP unscaling), and one NaN batch turns every weight into NaN for good.

With the kit: ``GradientClipping`` clips once per optimizer step, after AMP unscaling and
gradient accumulation, by global norm, value, per-unit AGC or adaptive thresholds, and logs the
pre-clip norm and the coefficient it applied on logging steps. ``NonFiniteGuard`` skips a step whose
gradients are NaN/inf (parameters and optimizer state untouched) and counts the skips.

Run: ``python examples/06_clipping.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import csv
import tempfile

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split
from torchmetrics.classification import MulticlassAccuracy

from lightning_optkit import OptimizerMixin, OptimizerSpec
from lightning_optkit.callbacks import GradientClipping, NonFiniteGuard
from lightning_optkit.demo import spirals


class SpiralNet(OptimizerMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.optim_spec = OptimizerSpec("adamw", lr=2e-2, weight_decay=0.01)
        self.body = nn.Sequential(nn.Linear(2, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 3)
        self.val_acc = MulticlassAccuracy(num_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch  # y: integer class indices, shape (batch,)
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)


def fit(callbacks: list[L.Callback], train: TensorDataset, val: TensorDataset, log_dir: str) -> tuple:
    L.seed_everything(0, verbose=False)
    model = SpiralNet()
    logger = CSVLogger(log_dir, name="clipping")
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=logger, log_every_n_steps=10, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("grad_clip/total_norm")]
    return model, trainer, rows


def main() -> None:
    logits = torch.randn(8, 3)
    soft = nn.functional.cross_entropy(logits, torch.rand(8, 3))
    print(f"the tutorial's cross_entropy(logits, torch.rand(8, 3)) = {soft:.3f}: no error, the random floats are "
          "taken as class probabilities; the targets below are integer classes")

    data = spirals(n_per_class=200)
    train, val = random_split(data, [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    x, y = data.tensors[0][train.indices], data.tensors[1][train.indices]
    log_dir = tempfile.mkdtemp(prefix="optkit-clipping-")

    for title, clipping in [
        ("norm clipping, max_norm=0.3", GradientClipping(max_norm=0.3)),
        ("AGC, clip_factor=0.01 (head excluded)", GradientClipping(algorithm="agc", clip_factor=0.01,
                                                                    exclude=("head",))),
    ]:
        _, trainer, rows = fit([clipping], TensorDataset(x, y), val, log_dir)
        print(f"\n{title}: val_acc={trainer.callback_metrics['val_acc']:.3f}; logged every 10 steps:")
        for row in rows[:4]:
            print(f"  step {int(row['step']):>3}  grad_clip/total_norm={float(row['grad_clip/total_norm']):.3f}"
                  f"  grad_clip/clip_coef={float(row['grad_clip/clip_coef']):.3f}")

    poisoned = x.clone()
    poisoned[3] = float("nan")  # one bad sample: the first batch of every epoch has NaN gradients
    for title, callbacks in [("no guard", [GradientClipping(max_norm=0.3)]),
                             ("NonFiniteGuard", [NonFiniteGuard(), GradientClipping(max_norm=0.3)])]:
        model, trainer, _ = fit(callbacks, TensorDataset(poisoned, y), val, log_dir)
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        skipped = trainer.callback_metrics.get("guard/skipped_steps")
        print(f"\nNaN batch, {title}: parameters finite: {finite}; val_acc={trainer.callback_metrics['val_acc']:.3f}"
              + (f"; guard/skipped_steps={skipped:.0f} of {trainer.global_step}" if skipped is not None else ""))


if __name__ == "__main__":
    main()
