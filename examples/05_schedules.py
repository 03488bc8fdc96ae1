"""Learning-rate schedules: StepLR and warmup-cosine, recorded during a real fit and plotted to a PNG.

By hand: ``return [optimizer], [StepLR(optimizer, step_size=...)]`` leaves Lightning's default
``interval="epoch"``, so a step_size meant in steps runs far too slowly; warmup-cosine is a
``LambdaLR`` whose lambda hard-codes the total number of steps.

With the kit: ``schedule=`` in the spec. A torch scheduler is a dict with its class and an
explicit ``interval``; a kit schedule is a name with durations that the Trainer resolves:
``step_size="2ep"``, ``warmup="10%"`` of the fit, ``min_lr_ratio`` as a floor relative to each
group's own lr (here the head learns 5x faster than the body, under one schedule).

Writes ``schedules.png`` to ``$OPTKIT_EXAMPLES_OUT`` (default: a new temporary folder) and prints its path.

Run: ``python examples/05_schedules.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy

from lightning_optkit import OptimizerMixin, OptimizerSpec, ParamGroup
from lightning_optkit.demo import spirals
from lightning_optkit.extras import require_in_script

GROUPS = [ParamGroup("body.*", name="body"), ParamGroup("head.*", name="head", lr_scale=5.0)]
SPECS = {
    "torch StepLR (per epoch)": OptimizerSpec(
        "sgd", lr=0.1, momentum=0.9, groups=GROUPS,
        schedule={"class": "torch.optim.lr_scheduler.StepLR", "step_size": 2, "gamma": 0.5, "interval": "epoch"},
    ),
    "kit step (step_size=2ep)": OptimizerSpec(
        "sgd", lr=0.1, momentum=0.9, groups=GROUPS, schedule={"name": "step", "step_size": "2ep", "gamma": 0.5},
    ),
    "kit warmup-cosine": OptimizerSpec(
        "adamw", lr=5e-3, weight_decay=0.01, no_decay=None, groups=GROUPS,
        schedule={"name": "cosine", "warmup": "10%", "min_lr_ratio": 0.05},
    ),
}


class LrRecorder(L.Callback):
    """Records every group's lr before each optimizer step (plain floats: no device sync)."""

    def __init__(self) -> None:
        self.lrs: dict[str, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for group in trainer.optimizers[0].param_groups:
            self.lrs.setdefault(group["name"], []).append(group["lr"])


class SpiralNet(OptimizerMixin, L.LightningModule):
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


def main() -> None:
    matplotlib = require_in_script("plot", "examples/05_schedules.py (the PNG)")  # one line if it is missing
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    out = Path(os.environ.get("OPTKIT_EXAMPLES_OUT") or tempfile.mkdtemp(prefix="optkit-schedules-"))
    out.mkdir(parents=True, exist_ok=True)
    train, val = random_split(spirals(n_per_class=200), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    figure, axes = plt.subplots(1, len(SPECS), figsize=(13, 3.6), sharex=True)
    for ax, (title, spec) in zip(axes, SPECS.items()):
        L.seed_everything(0, verbose=False)
        recorder = LrRecorder()
        trainer = L.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
        trainer.fit(SpiralNet(spec), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
        summary = ", ".join(f"{name} {lrs[0]:.3g} -> {max(lrs):.3g} -> {lrs[-1]:.3g}"
                            for name, lrs in recorder.lrs.items() if not name.endswith("no_decay"))
        print(f"{title:<26} val_acc={trainer.callback_metrics['val_acc']:.3f}  lr start -> peak -> end: {summary}")
        for name, lrs in recorder.lrs.items():
            ax.plot(lrs, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"optimizer step ({trainer.num_training_batches} per epoch)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("learning rate")
    figure.tight_layout()
    path = out / "schedules.png"
    figure.savefig(path, dpi=80)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
