"""The small regression model and data most callback tests fit (one definition instead of one per file).

Data come from torch's global generator, which the autouse fixture seeds per test, so every test sees
the same batches it saw with its own copy of these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def regression_loader(n: int = 48, batch_size: int = 8, target_scale: float = 1.0) -> DataLoader:
    """``n`` samples of 8 random inputs and 4 random targets (times ``target_scale``), in order."""
    return DataLoader(TensorDataset(torch.randn(n, 8), torch.randn(n, 4) * target_scale), batch_size=batch_size)


class MLPRegressor(pl.LightningModule):
    """An 8-16-4 tanh MLP trained on MSE; ``make_optimizer(parameters)`` builds its optimizer.

    The loss of the batches in ``bad_batches`` is multiplied by ``bad_factor`` (NaN unless given), as a
    broken batch would make it; ``-1`` in ``bad_batches`` means every batch from the second on.
    """

    def __init__(self, make_optimizer: MakeOptimizer, bad_batches: Iterable[int] = (),
                 bad_factor: float = math.nan) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.make_optimizer = make_optimizer
        self.bad_batches = set(bad_batches)
        self.bad_factor = bad_factor

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        if batch_idx in self.bad_batches or (-1 in self.bad_batches and batch_idx >= 1):
            loss = loss * self.bad_factor
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())
