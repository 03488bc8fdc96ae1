"""GradientClipping and NonFiniteGuard under a GradScaler (16-mixed), run on CPU with an explicit
``MixedPrecision(scaler=torch.amp.GradScaler("cpu"))`` plugin: the path GPUs take with fp16."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from fit_helpers import MLPRegressor, regression_loader
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard


def scaled_precision() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))


class Regressor(MLPRegressor):
    """torch's AdamW, fused or not; batch ``bad_batch``'s loss times ``bad_factor``."""

    def __init__(self, fused: bool, bad_batch: int | None = None, bad_factor: float = float("nan")) -> None:
        super().__init__(lambda params: torch.optim.AdamW(params, lr=0.01, fused=fused),
                         () if bad_batch is None else (bad_batch,), bad_factor)
        self.fused = fused


def make_loader() -> DataLoader:
    return regression_loader(96, target_scale=3)


@pytest.mark.parametrize("fused", [False, True])
def test_clipping_sees_unscaled_gradients(fused, quiet_trainer_kwargs):
    loader = make_loader()
    model = Regressor(fused)
    ref = copy.deepcopy(model.net)
    clip = GradientClipping(max_norm=0.5)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=4, plugins=[scaled_precision()], callbacks=[clip])
    trainer.fit(model, loader)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _, (x, y) in zip(range(4), loader, strict=False):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.half):
            loss = F.mse_loss(ref(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
    assert norm.item() > 0.5
    assert clip.last_total_norm.item() == pytest.approx(norm.item(), rel=1e-4)  # not 1024x
    for p, q in zip(model.net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bad_factor", [float("nan"), 1e3])
def test_guard_skips_nan_and_spikes_under_scaler(fused, bad_factor, quiet_trainer_kwargs):
    k = 6
    model = Regressor(fused, bad_batch=k, bad_factor=bad_factor)
    before = {}

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == k:
                before["params"] = [p.detach().clone() for p in pl_module.parameters()]
                before["scale"] = trainer.precision_plugin.scaler.get_scale()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == k:
                before["after"] = [p.detach().clone() for p in pl_module.parameters()]
                before["scale_after"] = trainer.precision_plugin.scaler.get_scale()

    guard = NonFiniteGuard(skip_on_spike=6.0, spike_warmup=4)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=k + 2, log_every_n_steps=1,
                         plugins=[scaled_precision()], callbacks=[guard, Snap()])
    trainer.fit(model, make_loader())
    for p, q in zip(before["params"], before["after"], strict=True):
        assert torch.equal(p, q)
    assert before["scale_after"] == before["scale"] / 2  # the scaler saw the skip as an inf step
    assert trainer.callback_metrics["guard/skipped_steps"].item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
