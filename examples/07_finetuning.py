"""Fine-tuning: backbone and head groups, layer-wise lr decay, and unfreezing the backbone after an epoch.

By hand: at the unfreeze epoch, ``optimizer.add_param_group({"params": backbone.parameters()})``
gives the new group the optimizer's default lr (not the smaller lr meant for pretrained layers),
decays biases and norm weights, and torch schedulers, which record their groups when created,
never scale it.

With the kit: the spec says it once. ``layer_decay`` gives each backbone block
``lr * rate ** (distance from the head)``; ``no_decay="auto"`` exempts biases and norms.
``frozen="include"`` plans the frozen backbone into its groups from the start: optimizers skip
parameters without a gradient, so it stays untouched while frozen. ``Unfreeze("backbone.*", at_epoch=1)``
sets ``requires_grad`` at that epoch, and from then on the backbone trains with its planned lr, weight
decay and the schedule's multiplier, like every other group. No second spec, no ``add_param_group``.

Run: ``python examples/07_finetuning.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy

from lightning_optkit import OptimizerMixin, OptimizerSpec, ParamGroup, plan
from lightning_optkit.callbacks import Unfreeze
from lightning_optkit.demo import spirals

UNFREEZE_EPOCH = 1
SCHEDULE = {"name": "cosine", "warmup": "5%", "min_lr_ratio": 0.1}
# One spec for the whole fit: the frozen backbone is planned too (frozen="include"), each block 0.5x the lr
# of the block above it; it starts training when Unfreeze sets requires_grad.
SPEC = OptimizerSpec("adamw", lr=1e-2, weight_decay=0.01,
                     groups=[ParamGroup("head.*", name="head"), ParamGroup("backbone.*", name="backbone")],
                     layer_decay={"rate": 0.5, "depth": r"re:^backbone\.(\d+)\."}, schedule=SCHEDULE,
                     frozen="include")


def block(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())


class Classifier(OptimizerMixin, L.LightningModule):
    """A stem, three backbone blocks (frozen at first) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.optim_spec = SPEC
        self.backbone = nn.Sequential(nn.Sequential(nn.Linear(2, 64), nn.GELU()), block(64), block(64), block(64))
        self.head = nn.Linear(64, 3)
        self.backbone.requires_grad_(False)
        self.val_acc = MulticlassAccuracy(num_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def on_train_epoch_start(self) -> None:
        if self.backbone[0][0].weight.requires_grad and self.current_epoch == UNFREEZE_EPOCH:
            groups = {g["name"] for g in self.trainer.optimizers[0].param_groups
                      if any(p.requires_grad for p in g["params"])}
            print(f"  unfroze the backbone at epoch {self.current_epoch}: groups training now {sorted(groups)}")

    def on_validation_epoch_end(self) -> None:
        print(f"  epoch {self.current_epoch}: val_acc={self.val_acc.compute():.3f}")


def main() -> None:
    L.seed_everything(0, verbose=False)
    model = Classifier()
    print("plan (the frozen backbone included: every parameter, its group, lr and weight decay):")
    print(plan(model, SPEC))

    train, val = random_split(spirals(n_per_class=200), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Unfreeze("backbone.*", at_epoch=UNFREEZE_EPOCH)])
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
    print("lr per group at the end (base lr -> lr after the cosine schedule, every group scaled alike):")
    for group in trainer.optimizers[0].param_groups:
        print(f"  {group['name']:<26} {group['initial_lr']:.2e} -> {group['lr']:.2e}  "
              f"weight_decay={group['weight_decay']}")


if __name__ == "__main__":
    main()
