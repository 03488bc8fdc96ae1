"""Fine-tuning: backbone and head groups, layer-wise lr decay, and unfreezing the backbone after an epoch.

By hand: at the unfreeze epoch, ``optimizer.add_param_group({"params": backbone.parameters()})``
gives the new group the optimizer's default lr (not the smaller lr meant for pretrained layers),
decays biases and norm weights, and torch schedulers, which record their groups when created,
never scale it.

With the kit: the spec says it once. ``layer_decay`` gives each backbone block
``lr * rate ** (distance from the head)``; ``no_decay="auto"`` exempts biases and norms. When the
backbone is unfrozen, ``plan(model, spec)`` says which group, lr and weight decay every newly trainable
parameter gets, and the callback adds exactly those groups. Kit schedules pick up groups added later
and scale them by the same curve as the others.

Run: ``python examples/07_finetuning.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy

from lightning_optkit import OptimizerMixin, OptimizerSpec, ParamGroup, plan
from lightning_optkit.demo import spirals

SCHEDULE = {"name": "cosine", "warmup": "5%", "min_lr_ratio": 0.1}
HEAD = ParamGroup("head.*", name="head")
# Epoch 0: only the head is trainable, so the spec describes only the head.
HEAD_ONLY = OptimizerSpec("adamw", lr=1e-2, weight_decay=0.01, groups=[HEAD], schedule=SCHEDULE)
# From the unfreeze epoch: the backbone joins, each block 0.5x the lr of the block above it.
FULL = OptimizerSpec("adamw", lr=1e-2, weight_decay=0.01, groups=[HEAD, ParamGroup("backbone.*", name="backbone")],
                     layer_decay={"rate": 0.5, "depth": r"re:^backbone\.(\d+)\."}, schedule=SCHEDULE)


def block(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())


class Classifier(OptimizerMixin, L.LightningModule):
    """A stem, three backbone blocks (frozen at first) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.optim_spec = HEAD_ONLY
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

    def on_validation_epoch_end(self) -> None:
        print(f"  epoch {self.current_epoch}: val_acc={self.val_acc.compute():.3f}")


class UnfreezeBackbone(L.Callback):
    """At ``epoch``, make the backbone trainable and add its param groups as ``spec`` plans them."""

    def __init__(self, spec: OptimizerSpec, epoch: int = 1) -> None:
        self.spec = spec
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        pl_module.backbone.requires_grad_(True)
        optimizer = trainer.optimizers[0]
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for group in plan(pl_module, self.spec).optimizers[0].groups:
            if all(id(p) not in held for p in group.params):
                # initial_lr is the base the schedule scales; lr is the value for the current step.
                optimizer.add_param_group({**group.as_dict(), "initial_lr": group.lr,
                                           "lr": group.lr * scheduler.multiplier()})
        print(f"  unfroze the backbone at epoch {self.epoch}: optimizer groups now "
              f"{[g['name'] for g in optimizer.param_groups]}")


def main() -> None:
    L.seed_everything(0, verbose=False)
    model = Classifier()
    print("plan after unfreezing (every backbone parameter, its group, lr and weight decay):")
    model.backbone.requires_grad_(True)
    print(plan(model, FULL))
    model.backbone.requires_grad_(False)

    train, val = random_split(spirals(n_per_class=200), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[UnfreezeBackbone(FULL, epoch=1)])
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
    print("lr per group at the end (base lr -> lr after the cosine schedule, every group scaled alike):")
    for group in trainer.optimizers[0].param_groups:
        print(f"  {group['name']:<26} {group['initial_lr']:.2e} -> {group['lr']:.2e}  "
              f"weight_decay={group['weight_decay']}")


if __name__ == "__main__":
    main()
