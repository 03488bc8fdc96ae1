"""GradientClipping and NonFiniteGuard with the kit's own optimizers (the defer_* path), on CPU."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from fit_helpers import MLPRegressor, regression_loader
from torch.utils.data import DataLoader

from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard
from lightning_optkit.optim.lion import Lion
from lightning_optkit.optim.modifiers import AcceptsStepModifiers
from lightning_optkit.optim.momentum_sgd import MomentumSGD

KIT = {
    "momentum_sgd": lambda ps: MomentumSGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "lion": lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1),
}


class Regressor(MLPRegressor):
    """The kit optimizer ``KIT[kind]``; batch ``bad_batch``'s loss is NaN."""

    def __init__(self, kind: str, bad_batch: int | None = None) -> None:
        super().__init__(lambda params: KIT[kind](params), () if bad_batch is None else (bad_batch,))
        self.kind = kind


def make_loader() -> DataLoader:
    return regression_loader(64, target_scale=3)


@pytest.mark.parametrize("kind", list(KIT))
def test_deferred_clip_matches_clipping_before_the_step(kind, quiet_trainer_kwargs):
    loader = make_loader()
    model = Regressor(kind)
    ref = copy.deepcopy(model.net)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=4, callbacks=[GradientClipping(max_norm=0.3)])
    trainer.fit(model, loader)
    assert isinstance(trainer.optimizers[0], AcceptsStepModifiers)
    opt = KIT[kind](ref.parameters())
    for _, (x, y) in zip(range(4), loader, strict=False):
        opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
        opt.step()
    assert norm.item() > 0.3
    for p, q in zip(model.net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KIT))
def test_nan_step_leaves_kit_optimizer_untouched(kind, quiet_trainer_kwargs):
    k = 2
    seen = {}

    class Snap(pl.Callback):
        def _take(self, trainer, pl_module):
            state = trainer.optimizers[0].state_dict()["state"]
            return ([p.detach().clone() for p in pl_module.parameters()],
                    {i: {n: v.clone() for n, v in s.items()} for i, s in state.items()})

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == k:
                seen["before"] = self._take(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == k:
                seen["after"] = self._take(trainer, pl_module)

    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=k + 2, log_every_n_steps=1,
                         callbacks=[GradientClipping(max_norm=0.3), NonFiniteGuard(), Snap()])
    model = Regressor(kind, bad_batch=k)
    trainer.fit(model, make_loader())
    (p0, s0), (p1, s1) = seen["before"], seen["after"]
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    assert s0.keys() == s1.keys() and s0
    for i in s0:
        assert all(torch.equal(s0[i][n], s1[i][n]) for n in s0[i]), i
    assert trainer.callback_metrics["guard/skipped_steps"].item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
