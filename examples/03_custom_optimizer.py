"""A custom optimizer on the kit's base class, registered by name and selected in a spec.

By hand (the tutorial's momentum SGD): a ``torch.optim.Optimizer`` subclass with a Python loop over the
parameters, state created lazily with ``if``s, no check of its hyperparameters, and the class
imported into every ``configure_optimizers`` that uses it.

With the kit: ``KitOptimizer`` supplies ``step`` (closure, gradient gathering, per device/dtype
buckets, torch's ``state_dict`` format, and the hooks GradientClipping and NonFiniteGuard use); a
subclass declares its hyperparameter checks, its state tensors and one ``_update`` written with
``torch._foreach_*`` ops. ``@register_optimizer`` makes it selectable by name, so a spec (or YAML)
says ``"tutorial_sgd"`` and gets keyword checking against its signature like any torch optimizer.

Run: ``python examples/03_custom_optimizer.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy

from lightning_optkit import OptimizerMixin, OptimizerSpec, SpecError, register_optimizer
from lightning_optkit.demo import spirals
from lightning_optkit.optim import KitOptimizer
from lightning_optkit.optim.base import beta, non_negative


@register_optimizer("tutorial_sgd")
class TutorialMomentumSGD(KitOptimizer):
    """The tutorial's momentum SGD: ``v <- momentum * v + g``, ``p <- p - lr * v``."""

    validators = {"lr": non_negative, "momentum": beta}  # run on every param group at construction
    state_names = ("velocity",)  # per-parameter state, created as zeros on the first step
    counts_steps = False  # this rule needs no step counter

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9) -> None:
        super().__init__(params, lr=lr, momentum=momentum)

    def _update(self, group, params, grads, state, steps) -> None:
        velocity = state["velocity"]
        torch._foreach_mul_(velocity, group["momentum"])
        torch._foreach_add_(velocity, grads)
        torch._foreach_add_(params, velocity, alpha=-group["lr"])


class SpiralNet(OptimizerMixin, L.LightningModule):
    def __init__(self, spec: OptimizerSpec) -> None:
        super().__init__()
        self.optim_spec = spec
        self.net = nn.Sequential(
            nn.Linear(2, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3)
        )
        self.val_acc = MulticlassAccuracy(num_classes=3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self.net(x), y)
        self.log("val_acc", self.val_acc)


def fit(spec: OptimizerSpec) -> tuple[SpiralNet, L.Trainer]:
    L.seed_everything(0, verbose=False)
    train, val = random_split(spirals(n_per_class=200), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    model = SpiralNet(spec)
    trainer = L.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
    return model, trainer


def main() -> None:
    # The spec checks keywords against the class's signature, and values with its validators.
    for bad in ({"betas": (0.9, 0.99)}, {"momentum": 1.5}):
        try:
            OptimizerSpec("tutorial_sgd", lr=0.05, **bad)
        except SpecError as err:
            print(f"SpecError: {err}")

    ours, trainer = fit(OptimizerSpec("tutorial_sgd", lr=0.1, momentum=0.9))
    print(f"tutorial_sgd ({type(trainer.optimizers[0]).__name__}): "
          f"val_acc={trainer.callback_metrics['val_acc']:.3f}")
    reference, trainer = fit(OptimizerSpec("sgd", lr=0.1, momentum=0.9))
    print(f"torch.optim.SGD(momentum=0.9): val_acc={trainer.callback_metrics['val_acc']:.3f}")
    diff = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), reference.parameters()))
    print(f"max parameter difference from torch.optim.SGD after {trainer.global_step} steps: {diff:.1e}")


if __name__ == "__main__":
    main()
