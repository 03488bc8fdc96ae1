"""No host sync on non-logging steps: GradientClipping(norm) with a torch optimizer, and
NonFiniteGuard with a fused torch AdamW (and with a kit optimizer)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from fit_helpers import MLPRegressor, regression_loader
from torch.utils.data import DataLoader

from lightning_optkit.callbacks.cadence import is_logging_step
from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard

# Every Python-level way a tensor's value reaches the host.
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class SyncCounter:
    """Counts calls of SYNC_METHODS while ``active``; per hook call, split by logging step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.count = 0
        self.calls: list[tuple[bool, int]] = []  # (logging step?, syncs in that hook call)
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                if self.active:
                    self.count += 1
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def watch(self, callback: pl.Callback, hooks=("on_before_optimizer_step", "on_train_batch_end")) -> None:
        for hook in hooks:
            inner = getattr(callback, hook)

            def wrapped(trainer, *args, _inner=inner, **kwargs):
                logging = is_logging_step(trainer)
                before = self.count
                self.active = True
                try:
                    return _inner(trainer, *args, **kwargs)
                finally:
                    self.active = False
                    self.calls.append((logging, self.count - before))

            setattr(callback, hook, wrapped)

    def syncs_on_quiet_steps(self) -> list[int]:
        return [n for logging, n in self.calls if not logging]


class Regressor(MLPRegressor):
    """``make_optimizer(params)``'s optimizer; batch ``bad_batch``'s loss is NaN."""

    def __init__(self, make_optimizer, bad_batch: int | None = None) -> None:
        super().__init__(make_optimizer, () if bad_batch is None else (bad_batch,))


def make_loader() -> DataLoader:
    return regression_loader(64)


def test_counter_detects_a_sync(monkeypatch):
    counter = SyncCounter(monkeypatch)
    counter.active = True
    torch.ones(()).item()
    bool(torch.ones(()))
    float(torch.ones(()))
    counter.active = False
    assert counter.count == 3


CLIP_CONFIGS = {
    "norm": dict(max_norm=0.5),
    "norm_per_param": dict(max_norm=0.5, per="param"),
    "value": dict(algorithm="value", max_value=0.01),
    "agc": dict(algorithm="agc", exclude=("net.2",)),
    "zscore": dict(algorithm="zscore", warmup_steps=2),
    "quantile": dict(algorithm="quantile", warmup_steps=2),
}


@pytest.mark.parametrize("algorithm", list(CLIP_CONFIGS))
def test_clipping_has_no_host_sync_off_logging_steps(algorithm, monkeypatch, quiet_trainer_kwargs):
    kwargs = CLIP_CONFIGS[algorithm]
    clip = GradientClipping(**kwargs)
    counter = SyncCounter(monkeypatch)
    counter.watch(clip, hooks=("on_before_optimizer_step",))
    model = Regressor(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=7, log_every_n_steps=4, callbacks=[clip])
    trainer.fit(model, make_loader())
    quiet = counter.syncs_on_quiet_steps()
    assert len(quiet) >= 4 and quiet == [0] * len(quiet)


def test_guard_with_fused_adamw_has_no_host_sync_off_logging_steps(monkeypatch, quiet_trainer_kwargs):
    guard = NonFiniteGuard()
    counter = SyncCounter(monkeypatch)
    counter.watch(guard)
    model = Regressor(lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True), bad_batch=2)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=7, log_every_n_steps=4, callbacks=[guard])
    trainer.fit(model, make_loader())
    quiet = counter.syncs_on_quiet_steps()
    assert len(quiet) >= 8 and quiet == [0] * len(quiet)
    assert trainer.callback_metrics["guard/skipped_steps"].item() == 1  # the NaN at batch 2 was skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_guard_with_plain_adamw_syncs_once_per_step(monkeypatch, quiet_trainer_kwargs):
    guard = NonFiniteGuard()
    counter = SyncCounter(monkeypatch)
    counter.watch(guard, hooks=("on_before_optimizer_step",))
    model = Regressor(lambda ps: torch.optim.AdamW(ps, lr=0.01))
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=5, log_every_n_steps=100, callbacks=[guard])
    trainer.fit(model, make_loader())
    quiet = counter.syncs_on_quiet_steps()
    assert len(quiet) >= 4 and quiet[1:] == [1] * (len(quiet) - 1)  # the documented cost: one bool per step


def test_guard_reads_the_skip_run_once_per_max_consecutive_skips_steps(monkeypatch, quiet_trainer_kwargs):
    # the documented amortised cost on the sync-free paths, with logging off: one read every N steps
    guard = NonFiniteGuard(max_consecutive_skips=3)
    counter = SyncCounter(monkeypatch)
    counter.watch(guard, hooks=("on_before_optimizer_step",))
    model = Regressor(lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True))
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=7, log_every_n_steps=0, callbacks=[guard])
    trainer.fit(model, make_loader())
    assert [n for _, n in counter.calls] == [0, 0, 1, 0, 0, 1, 0]
