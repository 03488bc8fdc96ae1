"""Two optimizers, a generator and a discriminator, with manual optimization through ``manual_step``.

By hand: two optimizers returned from ``configure_optimizers``, ``automatic_optimization = False``,
and in ``training_step`` ``zero_grad``/``manual_backward``/``step`` for each, with
``self.optimizers()`` indexed by position (swap the order and the wrong network trains) and the
schedulers stepped by hand, since Lightning steps none in manual optimization.

With the kit: a list of specs, each with ``params=`` and a ``name=``; the mixin switches to
manual optimization, and ``self.manual_step(loss, optimizer="disc")`` does backward, step and
zero_grad for the named optimizer, runs the kit callbacks inside the step, and steps its schedule.

The data: points on a circle of radius 2. Quality: the mean absolute error between the radius of
generated points and 2 (torchmetrics), before and after training.

Run: ``python examples/04_gan_manual.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanAbsoluteError

from lightning_optkit import OptimizerMixin, OptimizerSpec

NOISE_DIM = 4


def circle(n: int = 2048, radius: float = 2.0) -> TensorDataset:
    angle = torch.rand(n) * 2 * math.pi
    points = radius * torch.stack([angle.cos(), angle.sin()], dim=1) + 0.05 * torch.randn(n, 2)
    return TensorDataset(points)


class TinyGAN(OptimizerMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(NOISE_DIM, 64), nn.LeakyReLU(0.2), nn.Linear(64, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
        self.optim_spec = [
            OptimizerSpec("adam", lr=2e-3, betas=(0.5, 0.999), params="generator.*", name="gen"),
            OptimizerSpec("adam", lr=2e-3, betas=(0.5, 0.999), params="discriminator.*", name="disc",
                          schedule={"name": "cosine", "min_lr_ratio": 0.1}),
        ]
        self.radius_error = MeanAbsoluteError()

    def sample(self, n: int) -> torch.Tensor:
        return self.generator(torch.randn(n, NOISE_DIM, device=self.device))

    def training_step(self, batch, batch_idx):
        (real,) = batch
        ones, zeros = torch.ones_like(real[:, :1]), torch.zeros_like(real[:, :1])
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = self.sample(len(real))
        d_loss = bce(self.discriminator(real), ones) + bce(self.discriminator(fake.detach()), zeros)
        self.manual_step(d_loss, optimizer="disc")
        self.discriminator.requires_grad_(False)  # g_loss must leave no gradient on the discriminator
        g_loss = bce(self.discriminator(fake), ones)
        self.manual_step(g_loss, optimizer="gen")
        self.discriminator.requires_grad_(True)
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss})

    def validation_step(self, batch, batch_idx):
        radius = self.sample(512).norm(dim=1)
        self.radius_error(radius, torch.full_like(radius, 2.0))
        self.log("radius_mae", self.radius_error)


def main() -> None:
    L.seed_everything(0, verbose=False)
    gan = TinyGAN()
    val = DataLoader(TensorDataset(torch.zeros(1, 2)), batch_size=1)  # one validation call per epoch
    trainer = L.Trainer(max_epochs=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    before = trainer.validate(gan, val, verbose=False)[0]["radius_mae"]
    trainer.fit(gan, DataLoader(circle(), batch_size=64, shuffle=True), val)
    gen, disc = trainer.optimizers
    print(f"manual optimization: {not gan.automatic_optimization}; optimizers: gen={type(gen).__name__}, "
          f"disc={type(disc).__name__}; {trainer.global_step} optimizer steps")
    print(f"lr after training: disc {disc.param_groups[0]['lr']:.1e} (cosine schedule, floor 10%), "
          f"gen {gen.param_groups[0]['lr']:.1e} (no schedule)")
    after = trainer.callback_metrics["radius_mae"].item()
    print(f"generated points: |radius - 2| = {before:.3f} before training, {after:.3f} after")


if __name__ == "__main__":
    main()
