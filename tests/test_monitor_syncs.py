"""OptimizerMonitor's cost: nothing at all on steps that do not log, one host transfer on steps that do.

Every torch call made inside the monitor's hooks is recorded with a TorchFunctionMode (it sees tensor
methods such as ``.item()``, ``.tolist()``, ``float(t)`` and ``bool(t)`` too), per training batch.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch_calls import HOST_TRANSFERS, TorchCalls

from lightning_optkit.callbacks.base import PER_BATCH_HOOKS
from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.monitor import OptimizerMonitor

HOOKS = PER_BATCH_HOOKS  # every per-batch hook the monitor implements (the others are None, never dispatched)


class CountedMonitor(OptimizerMonitor):
    """The real monitor, with every hook it implements run under TorchCalls, grouped per batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: dict[int, list[str]] = defaultdict(list)

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name not in HOOKS or attr is None:
            return attr

        def counted(trainer, *args, **kwargs):
            with TorchCalls(any_tensor_to_cpu=True) as calls:
                out = attr(trainer, *args, **kwargs)
            self.calls[trainer.fit_loop.epoch_loop.batch_idx].extend(calls.names)
            return out

        return counted


class Tiny(LightningModule):
    def __init__(self, automatic: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = automatic
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.data = TensorDataset(torch.randn(80, 4), torch.randn(80, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        if self.automatic_optimization:
            return loss
        a, b = self.optimizers()
        a.zero_grad()
        b.zero_grad()
        self.manual_backward(loss)
        a.step()
        b.step()

    def configure_optimizers(self):
        if self.automatic_optimization:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.Adam(self.net[2].parameters())]

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)


@pytest.mark.parametrize(("automatic", "accumulate", "clip"), [
    (True, 1, True),   # automatic optimization with GradientClipping
    (True, 2, False),  # gradient accumulation: logs on optimizer steps, not batches
    (False, 1, False),  # manual optimization, two optimizers stepped per batch
])
def test_no_sync_off_logging_steps_and_one_transfer_on_them(tmp_path, quiet_trainer_kwargs, automatic,
                                                            accumulate, clip):
    monitor = CountedMonitor(every_n_steps=3)
    callbacks = [monitor] + ([GradientClipping(max_norm=1.0)] if clip else [])
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": CSVLogger(str(tmp_path))}, max_epochs=1,
                      accumulate_grad_batches=accumulate, callbacks=callbacks)
    trainer.fit(Tiny(automatic))

    # batches that completed an optimizer step, and the logger step each one had
    stepping = [b for b in range(10) if (b + 1) % accumulate == 0]
    logging = {b for i, b in enumerate(stepping) if (i + 1) % 3 == 0}
    assert logging, "the fit is too short to reach a logging step"
    for batch in range(10):
        names = monitor.calls[batch]
        if batch in logging:
            assert [n for n in names if n in HOST_TRANSFERS] == ["tolist"], (batch, names)
        else:
            assert names == [], f"batch {batch} does not log but ran torch calls {names}"
