"""The kit's callbacks are not dispatched for per-batch hooks they do not use; subclasses keep their overrides."""

from __future__ import annotations

import copy
import pickle

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback
from test_clipping import Regressor, make_loader

from lightning_optkit.callbacks import RestoreLoaderPosition
from lightning_optkit.callbacks.base import PER_BATCH_HOOKS
from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard
from lightning_optkit.callbacks.monitor import OptimizerMonitor
from lightning_optkit.callbacks.schedulefree import ScheduleFreeMode
from lightning_optkit.callbacks.unfreeze import Unfreeze
from lightning_optkit.mixin import ManualStepCheck

KIT_CALLBACKS = [GradientClipping(max_norm=1.0), NonFiniteGuard(), OptimizerMonitor(), ScheduleFreeMode(),
                 Unfreeze("net.*", at_epoch=1), RestoreLoaderPosition(), ManualStepCheck()]


@pytest.mark.parametrize("callback", KIT_CALLBACKS, ids=lambda c: type(c).__name__)
def test_only_the_hooks_a_callback_implements_are_dispatched(callback):
    for name in PER_BATCH_HOOKS:
        implemented = getattr(type(callback), name) is not getattr(Callback, name)
        assert (getattr(callback, name) is not None) == implemented, name
    assert any(getattr(callback, name) is None for name in PER_BATCH_HOOKS)
    for clone in (copy.deepcopy(callback), pickle.loads(pickle.dumps(callback))):
        assert [getattr(clone, n) is None for n in PER_BATCH_HOOKS] == [getattr(callback, n) is None
                                                                          for n in PER_BATCH_HOOKS]


class CountingClipping(GradientClipping):
    """A user's subclass: overrides hooks GradientClipping leaves alone and extends one it uses."""

    def __init__(self) -> None:
        super().__init__(max_norm=1.0)
        self.calls = {"on_train_batch_start": 0, "on_after_backward": 0, "on_before_optimizer_step": 0}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls["on_train_batch_start"] += 1

    def on_after_backward(self, trainer, pl_module):
        super().on_after_backward(trainer, pl_module)  # Callback's no-op, still reachable
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.calls["on_before_optimizer_step"] += 1


def test_subclass_overrides_are_dispatched_in_a_real_fit(quiet_trainer_kwargs):
    callback = CountingClipping()
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=4, callbacks=[callback])
    trainer.fit(Regressor(), make_loader())
    assert callback.calls == {"on_train_batch_start": 4, "on_after_backward": 4, "on_before_optimizer_step": 4}
    assert callback.last_total_norm is not None  # GradientClipping's own hook ran through super()
    assert callback.on_before_backward is None

