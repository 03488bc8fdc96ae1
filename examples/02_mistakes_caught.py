"""Two mistakes from the tutorial, caught before the first batch, and their corrected specs.

What the tutorial did wrong:

1. ``torch.optim.SGD(params, lr=0.1, lr_decay=1e-4)``: SGD has no ``lr_decay`` (only Adagrad has);
   the "decay" never happened.
2. Two optimizers, ``SGD(model.parameters())`` and ``Adam(model.fc2.parameters())``: fc2's weights
   were in both, so every step updated them twice, with two different rules.

With the kit: the first spec fails at construction and the second when the optimizers are built
(inside ``trainer.fit``, before any batch); each ``SpecError`` names the field, the bad value and the
fix. The corrected specs (an ``inverse_time`` schedule; a ``ChainSpec`` where SGD takes every parameter
Adam does not) then train.

Run: ``python examples/02_mistakes_caught.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy

from lightning_optkit import ChainSpec, OptimizerMixin, OptimizerSpec, SpecError, plan
from lightning_optkit.demo import spirals


class TwoLayerNet(OptimizerMixin, L.LightningModule):
    """The tutorial's model: fc1 -> ReLU -> fc2, on 2-D spirals."""

    def __init__(self, spec) -> None:
        super().__init__()
        self.optim_spec = spec
        self.fc1 = nn.Linear(2, 64)
        self.fc2 = nn.Linear(64, 3)
        self.val_acc = MulticlassAccuracy(num_classes=3)
        self.batches_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        self.batches_seen += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)


def fit(model: TwoLayerNet) -> L.Trainer:
    train, val = random_split(spirals(n_per_class=200), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
    return trainer


def main() -> None:
    L.seed_everything(0, verbose=False)

    print("Mistake 1: SGD with lr_decay")
    try:
        OptimizerSpec("sgd", lr=0.1, lr_decay=1e-4)
    except SpecError as err:
        print(f"  SpecError: {err}")
    fixed = OptimizerSpec("sgd", lr=0.1, momentum=0.9, schedule={"name": "inverse_time", "lr_decay": 1e-3})
    trainer = fit(TwoLayerNet(fixed))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    print(f"  corrected: {fixed}\n  trained: val_acc={trainer.callback_metrics['val_acc']:.3f}, lr decayed "
          f"0.1 -> {lr:.4f} after {trainer.global_step} steps")

    print("\nMistake 2: all parameters to SGD, and fc2 to Adam as well")
    # params="*" is the tutorial's model.parameters(): every parameter, fc2 included.
    overlapping = [OptimizerSpec("sgd", lr=0.1, params="*"), OptimizerSpec("adam", lr=1e-3, params="fc2.*")]
    model = TwoLayerNet(overlapping)
    try:
        fit(model)
    except SpecError as err:
        print(f"  SpecError: {err}")
        print(f"  batches trained before the error: {model.batches_seen}")
    # Fixed: each parameter has one optimizer. SGD (no params=) takes whatever Adam does not; a
    # ChainSpec steps both as one optimizer, so Lightning's automatic optimization still applies.
    chained = ChainSpec([OptimizerSpec("sgd", lr=0.1, momentum=0.9), OptimizerSpec("adam", lr=1e-2, params="fc2.*")])
    model = TwoLayerNet(chained)
    print(plan(model, chained))
    trainer = fit(model)
    print(f"  corrected: trained with {type(trainer.optimizers[0]).__name__}, "
          f"val_acc={trainer.callback_metrics['val_acc']:.3f}")


if __name__ == "__main__":
    main()
