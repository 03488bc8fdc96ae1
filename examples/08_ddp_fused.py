"""DDP on CPU (two processes, gloo) with the kit's fused AdamW; the ranks end with identical parameters.

By hand: clipping or NaN checks on each rank's *local* gradients (before DDP's all-reduce), with
``.item()`` calls that stall every step; ranks can then disagree on whether to skip or how much to
clip, and their weights drift apart silently.

With the kit: ``OptimizerSpec("fused_adamw", max_grad_norm=...)`` runs AdamW, global-norm
clipping and the non-finite skip inside one fused step on the all-reduced gradients, with no host
sync, so every rank makes the same decision. The script all-gathers a float64 checksum of the
parameters at the end and checks that both ranks hold the same model.

Lightning launches the second rank by re-running this script, so everything runs under
``if __name__ == "__main__":``.

Run: ``python examples/08_ddp_fused.py`` (CPU, two processes, ~10 seconds).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy

from lightning_optkit import OptimizerMixin, OptimizerSpec
from lightning_optkit.demo import spirals


class SpiralNet(OptimizerMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.optim_spec = OptimizerSpec("fused_adamw", lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)
        self.net = nn.Sequential(nn.Linear(2, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                                 nn.Linear(64, 3))
        self.val_acc = MulticlassAccuracy(num_classes=3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self.net(x), y)
        self.log("val_acc", self.val_acc)  # torchmetrics syncs the accuracy across ranks

    def on_fit_end(self) -> None:
        checksum = torch.stack([p.detach().double().sum() for p in self.parameters()]).sum()
        sums = self.all_gather(checksum)  # one value per rank
        if self.trainer.is_global_zero:
            optimizer = self.trainer.optimizers[0]
            same = bool(torch.all(sums == sums[0]))
            print(f"{self.trainer.world_size} ranks, optimizer {type(optimizer).__name__}, "
                  f"{self.trainer.global_step} steps, val_acc={self.trainer.callback_metrics['val_acc']:.3f}")
            print(f"parameter checksums per rank: {[f'{s:.12f}' for s in sums.tolist()]}")
            print("ranks hold identical parameters" if same else "ERROR: ranks diverged")


def main() -> None:
    L.seed_everything(0, verbose=False)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
    train, val = random_split(spirals(n_per_class=200), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(SpiralNet(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
    if torch.distributed.is_initialized():  # Lightning leaves the group alive; end it before exit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
