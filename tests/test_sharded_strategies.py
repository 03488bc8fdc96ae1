"""Under strategies that shard parameters, what would compute norms per shard is refused before training.

FSDP and DeepSpeed need a GPU in Lightning, so a real CPU Trainer gets the strategy swapped in (an
uninitialised instance: only its type is read).
"""

from __future__ import annotations

import lightning.pytorch as pl
import lightning.pytorch.strategies as strategies
import pytest
import torch
from test_clipping import Regressor

from lightning_optkit import OptimizerSpec, build_optimizers
from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard
from lightning_optkit.callbacks.monitor import OptimizerMonitor
from lightning_optkit.errors import SpecError

SHARDED = ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"]


def trainer_with(strategy: str, monkeypatch) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    cls = getattr(strategies, strategy)
    monkeypatch.setattr(trainer._accelerator_connector, "strategy", cls.__new__(cls))  # no GPU here
    return trainer


@pytest.mark.parametrize("strategy", SHARDED)
@pytest.mark.parametrize("callback", [GradientClipping(max_norm=1.0), NonFiniteGuard(), OptimizerMonitor()],
                         ids=lambda c: type(c).__name__)
def test_norm_reading_callbacks_are_refused_at_setup(callback, strategy, monkeypatch):
    trainer = trainer_with(strategy, monkeypatch)
    with pytest.raises(SpecError, match=rf"Trainer\(strategy\)={strategy!r}.*shards the parameters.*Fix: remove"):
        callback.setup(trainer, Regressor(), "fit")


@pytest.mark.parametrize("strategy", SHARDED)
@pytest.mark.parametrize("optimizer", ["fused_adamw", "lamb"])
def test_optimizers_with_cross_tensor_norms_are_refused(optimizer, strategy, monkeypatch):
    trainer = trainer_with(strategy, monkeypatch)
    with pytest.raises(SpecError, match=rf"optimizer=.*computes norms across whole tensors.*{strategy}.*Fix:"):
        build_optimizers(Regressor(), OptimizerSpec(optimizer=optimizer, lr=1e-3), trainer=trainer)


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "adan", "momentum_sgd"])
def test_element_wise_optimizers_build_under_a_sharded_strategy(optimizer, monkeypatch):
    trainer = trainer_with("FSDPStrategy", monkeypatch)
    opt = build_optimizers(Regressor(), OptimizerSpec(optimizer=optimizer, lr=1e-3), trainer=trainer)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == 1e-3


def test_ddp_keeps_everything(monkeypatch):
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False, enable_progress_bar=False)
    for callback in (GradientClipping(max_norm=1.0), NonFiniteGuard()):
        callback.setup(trainer, Regressor(), "fit")
    build_optimizers(Regressor(), OptimizerSpec(optimizer="fused_adamw", lr=1e-3), trainer=trainer)
