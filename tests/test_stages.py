"""The gradient-stage contract: each kit callback declares its role, and one rule orders them in a fit."""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard
from lightning_optkit.callbacks.monitor import OptimizerMonitor
from lightning_optkit.callbacks.stages import (
    ClipReport,
    GradientStage,
    clip_reports,
    declared_norm_types,
    gradient_stages,
    order_gradient_stages,
)


class Recorder(pl.Callback):
    """A user callback that records the order in which the stages saw the optimizer step."""

    def __init__(self, seen: list[str], name: str) -> None:
        self.seen, self.name = seen, name

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.seen.append(self.name)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_kit_callbacks_declare_their_role_and_norm_types() -> None:
    clip, guard, monitor = GradientClipping(max_norm=1.0, norm_type=1.0), NonFiniteGuard(), OptimizerMonitor()
    assert [c.gradient_role for c in (monitor, clip, guard)] == ["observe", "modify", "decide"]
    assert all(isinstance(c, GradientStage) for c in (clip, guard, monitor))
    assert isinstance(clip, ClipReport) and not isinstance(guard, ClipReport)
    assert clip.grad_norm_types == (1.0,) and guard.grad_norm_types == (2.0,) and monitor.grad_norm_types == ()


class FakeTrainer:
    """Only the attribute the ordering rule reads and writes."""

    def __init__(self, callbacks: list) -> None:
        self.callbacks = callbacks


def _at(callbacks: list, callback) -> int:
    return next(i for i, cb in enumerate(callbacks) if cb is callback)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_stages_run_in_role_order_and_user_callbacks_keep_their_side_of_the_clipper(perm) -> None:
    monitor, clip, guard = stages = [OptimizerMonitor(), GradientClipping(max_norm=1.0), NonFiniteGuard()]
    user_a, user_b = pl.Callback(), pl.Callback()
    listed = [stages[perm[0]], user_a, stages[perm[1]], user_b, stages[perm[2]]]
    trainer = FakeTrainer(list(listed))
    order_gradient_stages(trainer)  # type: ignore[arg-type]
    after = trainer.callbacks
    assert sorted(map(id, after)) == sorted(map(id, listed))  # nothing lost or repeated
    assert _at(after, monitor) < _at(after, clip) < _at(after, guard)
    for user in (user_a, user_b):  # a user callback before the clipper sees raw gradients, after it clipped ones
        assert (_at(after, user) < _at(after, clip)) == (_at(listed, user) < _at(listed, clip))
    assert _at(after, user_a) < _at(after, user_b)
    order_gradient_stages(trainer)  # type: ignore[arg-type]
    assert trainer.callbacks is after  # idempotent: in order, the list is left alone
    assert gradient_stages(trainer) == stages and gradient_stages(trainer, "modify") == [clip]  # type: ignore[arg-type]
    assert clip_reports(trainer) == [clip]  # type: ignore[arg-type]
    assert declared_norm_types(trainer) == [2.0, 2.0]  # type: ignore[arg-type]


def test_two_clippers_keep_their_relative_order() -> None:
    first, second = GradientClipping(max_norm=1.0), GradientClipping(algorithm="value", max_value=0.5)
    guard, monitor = NonFiniteGuard(), OptimizerMonitor()
    trainer = FakeTrainer([guard, first, monitor, second])
    order_gradient_stages(trainer)  # type: ignore[arg-type]
    assert trainer.callbacks == [monitor, first, second, guard]
    trainer = FakeTrainer([second, monitor, guard, first])
    order_gradient_stages(trainer)  # type: ignore[arg-type]
    assert trainer.callbacks == [monitor, second, first, guard]


def test_in_a_fit_the_stages_run_observe_modify_decide_whatever_the_order_given(tmp_path) -> None:
    seen: list[str] = []

    def recording(stage, name):
        original = type(stage).on_before_optimizer_step

        def hook(trainer, pl_module, optimizer):
            seen.append(name)
            return original(stage, trainer, pl_module, optimizer)

        stage.on_before_optimizer_step = hook
        return stage

    guard = recording(NonFiniteGuard(), "guard")
    clip = recording(GradientClipping(max_norm=1.0), "clip")
    monitor = recording(OptimizerMonitor(per_layer=False), "monitor")
    user = Recorder(seen, "user")
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                         default_root_dir=str(tmp_path), logger=pl.loggers.CSVLogger(tmp_path),
                         callbacks=[guard, user, clip, monitor])
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))
    assert seen == ["user", "monitor", "clip", "guard"] * 2  # the user callback stays ahead of clipping
