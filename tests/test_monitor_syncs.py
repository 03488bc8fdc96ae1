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


class CountedHooks:
    """Mixed into a real kit callback: every hook it implements runs under TorchCalls, grouped per batch."""

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


class CountedMonitor(CountedHooks, OptimizerMonitor):
    """The real monitor, its hooks counted."""


class CountedClipping(CountedHooks, GradientClipping):
    """The real GradientClipping, its hooks counted."""


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


def test_the_monitor_and_clipping_share_one_transfer_per_logging_step(tmp_path, quiet_trainer_kwargs):
    """Both write through the one row: the clip values and the monitor's norms go to the host together."""
    monitor, clipping = CountedMonitor(), CountedClipping(max_norm=0.01)
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": CSVLogger(str(tmp_path))}, max_epochs=1,
                      log_every_n_steps=3, callbacks=[monitor, clipping])
    trainer.fit(Tiny())

    logging = {2, 5, 8}
    for batch in range(10):
        transfers = [n for cb in (monitor, clipping) for n in cb.calls[batch] if n in HOST_TRANSFERS]
        assert transfers == (["tolist"] if batch in logging else []), (batch, transfers)
        assert clipping.calls[batch], "the clipper ran no torch call: the count proves nothing"
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [dict(zip(header, line.split(","), strict=True))
                for header in [f.readline().strip().split(",")] for line in f.read().splitlines()]
    assert [r["step"] for r in rows] == ["2", "5", "8"]  # one row per logging step, with both callbacks' keys
    assert all(r["grad_clip/clip_coef"] and r["grad_norm/total"] and r["grad_norm/layer/net.0"] for r in rows)
