"""The shared norm cache is never stale: a gradient changed in place by a user callback is measured again.

GradientClipping and OptimizerMonitor compute the step's gradient norms once and NonFiniteGuard reuses
them. A callback registered between them that writes an inf into a gradient in place must still make
the guard skip that step (before the fix the guard reused the finite norms, the inf reached the
parameters and every later step was skipped until TooManySkippedSteps).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit.callbacks import GradientClipping, NonFiniteGuard, OptimizerMonitor
from lightning_optkit.optim.lamb import LAMB

BAD_STEP = 3


class WriteInf(pl.Callback):
    """At optimizer step BAD_STEP, write an inf into one gradient element in place; record the parameters."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] | None = None
        self.after: list[torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == BAD_STEP:
            self.before = [p.detach().clone() for p in pl_module.parameters()]
            next(pl_module.parameters()).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.before is not None and self.after is None:
            self.after = [p.detach().clone() for p in pl_module.parameters()]


class Regressor(pl.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        self.optimizer_kind = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer_kind == "lamb":  # kit optimizer: clipping defers its scale, the guard its skip flag
            return LAMB(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.05)  # torch optimizer: in-place clip, host-read skip


@pytest.mark.parametrize("reader", ["clipping", "monitor"])
@pytest.mark.parametrize("optimizer", ["sgd", "lamb"])
def test_guard_sees_an_inf_written_after_the_norms_were_cached(tmp_path, reader, optimizer) -> None:
    writer = WriteInf()
    guard = NonFiniteGuard(max_consecutive_skips=3)
    first = GradientClipping(max_norm=1.0) if reader == "clipping" else OptimizerMonitor(every_n_steps=1)
    data = DataLoader(TensorDataset(torch.randn(64, 6), torch.randn(64, 3)), batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         log_every_n_steps=1, callbacks=[first, writer, guard])
    model = Regressor(optimizer)
    trainer.fit(model, data)  # before the fix: TooManySkippedSteps, the inf having reached the parameters

    assert writer.before is not None and writer.after is not None
    for before, after in zip(writer.before, writer.after):
        assert torch.equal(before, after), "the step with the inf gradient was not skipped"
    assert int(guard._tracks[0].skipped) == 1 and int(guard._tracks[0].consecutive) == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 8  # all eight batches stepped (the skipped step counts, as in Lightning)
