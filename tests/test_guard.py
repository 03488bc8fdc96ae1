"""NonFiniteGuard with real Lightning Trainers on CPU: exact skips, counters, errors, interplay."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from fit_helpers import MLPRegressor, regression_loader
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard, TooManySkippedSteps
from lightning_optkit.errors import SpecError
from lightning_optkit.optim.modifiers import StepModifiers


def make_loader(n: int = 96, batch_size: int = 8) -> DataLoader:
    return regression_loader(n, batch_size)


class ModSGD(StepModifiers, torch.optim.Optimizer):
    """A minimal kit-style optimizer honouring the deferred scale and skip flag, branch-free."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale, skip = self.pop_step_modifiers()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad * group["lr"]
                if scale is not None:
                    update = update * scale
                if skip is not None:
                    update = torch.where(skip, torch.zeros_like(update), update)
                p.sub_(update)
        return loss


def make_optimizer(kind: str, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.01)
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, lr=0.01, fused=True)
    return ModSGD(params, lr=0.05)


class Regressor(MLPRegressor):
    """``make_optimizer(optimizer, params)``'s optimizer; see MLPRegressor for ``bad_batches``."""

    def __init__(self, optimizer: str, bad_batches=(), bad_factor: float = math.nan) -> None:
        super().__init__(lambda params: make_optimizer(optimizer, params), bad_batches, bad_factor)
        self.optimizer_kind = optimizer


def snapshot(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    state = optimizer.state_dict()["state"]
    return {
        "params": [p.detach().clone() for p in module.parameters()],
        "state": {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in state.items()},
    }


def assert_bit_identical(a: dict, b: dict) -> None:
    assert len(a["params"]) == len(b["params"])
    for p, q in zip(a["params"], b["params"], strict=True):
        assert torch.equal(p, q)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (k, name)


class Snapshots(pl.Callback):
    """Model and optimizer state around the given batches; also ``extra()`` after each of them."""

    def __init__(self, batches, extra=lambda: None) -> None:
        self.batches, self.extra = set(batches), extra
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}
        self.extras: dict[int, object] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.batches:
            self.before[batch_idx] = snapshot(pl_module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx in self.batches:
            self.after[batch_idx] = snapshot(pl_module, trainer.optimizers[0])
            self.extras[batch_idx] = self.extra()


def read_csv_column(logger: CSVLogger, key: str) -> list[float]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


@pytest.mark.parametrize("kind", ["adamw", "adamw_fused", "kit"])
def test_nan_step_is_skipped_exactly_and_counted(kind, quiet_trainer_kwargs, tmp_path):
    k = 3
    model = Regressor(kind, bad_batches=(k,))
    snaps = Snapshots([k, k + 1])
    logger = CSVLogger(tmp_path, name="guard")
    kwargs = {**quiet_trainer_kwargs, "logger": logger}
    trainer = pl.Trainer(**kwargs, max_steps=k + 3, log_every_n_steps=1, callbacks=[NonFiniteGuard(), snaps])
    trainer.fit(model, make_loader())
    assert trainer.global_step == k + 3  # the run went on to the end
    assert_bit_identical(snaps.before[k], snaps.after[k])
    after_next = snaps.after[k + 1]["params"]
    assert not all(torch.equal(p, q) for p, q in zip(snaps.before[k + 1]["params"], after_next, strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.callback_metrics["guard/skipped_steps"].item() == 1
    assert trainer.callback_metrics["guard/consecutive_skips"].item() == 0
    logged = read_csv_column(logger, "guard/skipped_steps")
    assert logged[:k] == [0.0] * k and logged[-1] == 1.0
    optimizer = trainer.optimizers[0]
    assert "found_inf" not in optimizer.__dict__  # no skip flag left behind on a fused optimizer
    if kind != "kit":
        steps = {int(s["step"]) for s in optimizer.state_dict()["state"].values()}
        assert steps == {k + 3 - 1}  # the skipped step did not advance Adam's step counter


@pytest.mark.parametrize("kind", ["adamw", "adamw_fused"])
def test_consecutive_skips_raise(kind, quiet_trainer_kwargs):
    model = Regressor(kind, bad_batches=(-1,))  # every batch from 1 on is NaN
    guard = NonFiniteGuard(max_consecutive_skips=3)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=20, log_every_n_steps=1, callbacks=[guard])
    with pytest.raises(TooManySkippedSteps, match=r"skipped 3 consecutive .*max_consecutive_skips=3"):
        trainer.fit(model, make_loader())
    assert trainer.global_step == 3  # batch 0 fine, batches 1 and 2 skipped, batch 3 raised
    assert "found_inf" not in trainer.optimizers[0].__dict__


@pytest.mark.parametrize("log_every", [0, 50])
@pytest.mark.parametrize("kind", ["adamw_fused", "kit"])
def test_consecutive_skips_raise_on_sync_free_paths_without_logging_steps(kind, log_every, quiet_trainer_kwargs):
    # the device counter is read every max_consecutive_skips optimizer steps, whatever the logging cadence
    model = Regressor(kind, bad_batches=(-1,))  # every batch from 1 on is NaN
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=20, log_every_n_steps=log_every,
                         callbacks=[NonFiniteGuard(max_consecutive_skips=3)])
    with pytest.raises(TooManySkippedSteps, match=r"skipped 5 consecutive .*max_consecutive_skips=3"):
        trainer.fit(model, make_loader())
    # reads after optimizer steps 3 and 6 (batches 2 and 5): the run is 2, then 5 (< 2 * 3 - 1 = the bound)
    assert trainer.global_step == 5
    assert "found_inf" not in trainer.optimizers[0].__dict__


@pytest.mark.parametrize("kind", ["adamw_fused", "kit"])
def test_run_of_skips_at_the_end_of_the_fit_raises(kind, quiet_trainer_kwargs):
    model = Regressor(kind, bad_batches=(-1,))
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=4, log_every_n_steps=0,
                         callbacks=[NonFiniteGuard(max_consecutive_skips=3)])
    # batches 1-3 skipped; the read after step 3 saw a run of 2, the one at the end of the fit sees 3
    with pytest.raises(TooManySkippedSteps, match=r"skipped 3 consecutive"):
        trainer.fit(model, make_loader())
    assert trainer.global_step == 4


class WithAuxHead(Regressor):
    """A second head with its own loss term, which the spike at the bad batch does not reach."""

    def __init__(self, optimizer: str, bad_batch: int) -> None:
        super().__init__(optimizer, bad_batches=(bad_batch,), bad_factor=1e4)
        self.aux = nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + F.mse_loss(self.aux(batch[0]), batch[1])


@pytest.mark.parametrize("order", ["clip_first", "guard_first"])
@pytest.mark.parametrize("kind", ["adamw", "kit"])
def test_spike_is_skipped_when_a_clipping_exclude_runs_first_or_second(order, kind, quiet_trainer_kwargs):
    k = 8
    # exclude: clipping norms a subset of the gradients and scales it in place; the guard must still
    # judge the pre-clip norm of all gradients (the clipped ones hide the spike)
    clip = GradientClipping(max_norm=0.05, exclude=("aux",))
    guard = NonFiniteGuard(skip_on_spike=6.0, spike_warmup=4)
    snaps = Snapshots([k])
    callbacks = [clip, guard] if order == "clip_first" else [guard, clip]
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=k + 1, log_every_n_steps=1, callbacks=[*callbacks, snaps])
    trainer.fit(WithAuxHead(kind, bad_batch=k), make_loader())
    assert_bit_identical(snaps.before[k], snaps.after[k])
    assert trainer.callback_metrics["guard/skipped_steps"].item() == 1


def test_one_bad_batch_never_raises_even_with_the_smallest_limit(quiet_trainer_kwargs):
    model = Regressor("adamw", bad_batches=(2, 4))
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=6, log_every_n_steps=1,
                         callbacks=[NonFiniteGuard(max_consecutive_skips=2)])
    trainer.fit(model, make_loader())
    assert trainer.callback_metrics["guard/skipped_steps"].item() == 2


def test_spike_is_skipped_after_warmup(quiet_trainer_kwargs):
    k = 8
    model = Regressor("adamw", bad_batches=(k,), bad_factor=1e4)
    snaps = Snapshots([k])
    guard = NonFiniteGuard(skip_on_spike=6.0, spike_warmup=4)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=k + 2, log_every_n_steps=1, callbacks=[guard, snaps])
    trainer.fit(model, make_loader())
    assert_bit_identical(snaps.before[k], snaps.after[k])
    assert trainer.callback_metrics["guard/skipped_steps"].item() == 1


@pytest.mark.parametrize("order", ["clip_first", "guard_first"])
@pytest.mark.parametrize("kind", ["adamw", "adamw_fused", "kit"])
def test_skip_wins_over_clipping(order, kind, quiet_trainer_kwargs):
    k = 2
    clip, guard = GradientClipping(max_norm=0.5), NonFiniteGuard()
    snaps = Snapshots([k], extra=lambda: clip.last_clip_coef)
    callbacks = [clip, guard] if order == "clip_first" else [guard, clip]
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=k + 2, log_every_n_steps=1,
                         callbacks=[*callbacks, snaps])
    trainer.fit(Regressor(kind, bad_batches=(k,)), make_loader())
    assert_bit_identical(snaps.before[k], snaps.after[k])
    coef = snaps.extras[k]
    # whatever the order: the guard runs after the clipper (its host path drops the gradients)
    assert torch.isnan(coef), "a NaN norm must give a NaN coefficient, never a finite one"
    assert torch.isfinite(clip.last_clip_coef)


def test_kit_optimizer_receives_deferred_scale(quiet_trainer_kwargs):
    loader = make_loader()
    model = Regressor("kit")
    ref = copy.deepcopy(model.net)
    clip = GradientClipping(max_norm=0.3)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=3, callbacks=[clip])
    trainer.fit(model, loader)
    for _, (x, y) in zip(range(3), loader, strict=False):
        ref.zero_grad()
        F.mse_loss(ref(x), y).backward()
        raw = [p.grad.clone() for p in ref.parameters()]
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
        with torch.no_grad():
            for p in ref.parameters():
                p.sub_(0.05 * p.grad)
    assert norm.item() > 0.3
    for p, q in zip(model.net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for p, g in zip(model.net.parameters(), raw, strict=True):  # deferred: grads were not scaled in place
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(skip_on_spike=-1.0), "skip_on_spike"),
        (dict(skip_on_spike=math.inf), "skip_on_spike"),
        (dict(max_consecutive_skips=0), "max_consecutive_skips"),
        (dict(max_consecutive_skips=1), "max_consecutive_skips"),  # one bad batch must never be fatal
        (dict(max_consecutive_skips=2.5), "max_consecutive_skips"),
        (dict(skip_on_spike=3.0, spike_warmup=0), "spike_warmup"),
        (dict(skip_on_spike=3.0, spike_alpha=1.0), "spike_alpha"),
        (dict(spike_warmup=5), "skip_on_spike"),
        (dict(norm_type=-2), "norm_type"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(SpecError) as err:
        NonFiniteGuard(**kwargs)
    assert err.value.field == field
    assert "Fix:" in str(err.value)


def test_counters_and_spike_stats_resume_from_checkpoint(quiet_trainer_kwargs, tmp_path):
    loader = make_loader(n=48)  # 6 batches per epoch
    guard = NonFiniteGuard(skip_on_spike=6.0, spike_warmup=3)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_epochs=1, callbacks=[guard])
    trainer.fit(Regressor("adamw", bad_batches=(2,)), loader)
    ckpt = tmp_path / "guard.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = guard.state_dict()[0]

    resumed = NonFiniteGuard(skip_on_spike=6.0, spike_warmup=3)
    loaded = {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            loaded.update(resumed.state_dict()[0])

    trainer = pl.Trainer(**quiet_trainer_kwargs, max_epochs=2, log_every_n_steps=1, callbacks=[resumed, Peek()])
    trainer.fit(Regressor("adamw"), loader, ckpt_path=ckpt)
    assert loaded["skipped"].item() == 1
    for name in ("mean", "var", "count"):
        assert torch.equal(loaded["stats"][name], saved["stats"][name])
    assert trainer.callback_metrics["guard/skipped_steps"].item() == 1


def test_a_new_fit_with_the_same_guard_counts_from_zero(quiet_trainer_kwargs):
    """Callback instances reused by a second Trainer: the first fit's skips are not the second's."""
    guard = NonFiniteGuard()
    first = pl.Trainer(**quiet_trainer_kwargs, max_steps=6, log_every_n_steps=1, callbacks=[guard])
    first.fit(Regressor("adamw", bad_batches=(1, 3)), make_loader())
    assert first.callback_metrics["guard/skipped_steps"].item() == 2
    second = pl.Trainer(**quiet_trainer_kwargs, max_steps=4, log_every_n_steps=1, callbacks=[guard])
    second.fit(Regressor("adamw"), make_loader())
    assert second.callback_metrics["guard/skipped_steps"].item() == 0


@pytest.mark.parametrize("order", ["guard-first", "guard-last"])
def test_a_skipped_step_is_logged_alike_whatever_the_callback_order(order, quiet_trainer_kwargs, tmp_path):
    """Clipping and the monitor report the broken step's NaN norm even when the guard is listed first.

    With a plain torch optimizer the guard skips by setting the gradients to None, so it must run after
    every callback that reads them; it moves itself there at setup.
    """
    from lightning_optkit.callbacks.clipping import GradientClipping
    from lightning_optkit.callbacks.monitor import OptimizerMonitor

    guard, clip, monitor = NonFiniteGuard(), GradientClipping(max_norm=1.0), OptimizerMonitor(per_layer=False)
    callbacks = [guard, clip, monitor] if order == "guard-first" else [clip, monitor, guard]
    logger = CSVLogger(tmp_path, name="order")
    trainer = pl.Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=5, log_every_n_steps=1,
                         callbacks=callbacks)
    trainer.fit(Regressor("adamw", bad_batches=(3,)), make_loader())
    assert trainer.callbacks.index(guard) > max(trainer.callbacks.index(clip), trainer.callbacks.index(monitor))
    merged: dict[int, dict[str, str]] = {}
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            merged.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v != ""})
    assert sorted(merged) == [0, 1, 2, 3, 4]
    # the pre-clip norm is the monitor's (grad_clip/total_norm would repeat it); a NaN norm gives a NaN coefficient
    assert math.isnan(float(merged[3]["grad_clip/clip_coef"])) and math.isnan(float(merged[3]["grad_norm/total"]))
    assert all(math.isfinite(float(merged[s]["grad_clip/clip_coef"])) for s in (0, 1, 2, 4))
    assert not any("grad_clip/total_norm" in row for row in merged.values())
    assert float(merged[4]["guard/skipped_steps"]) == 1


# ------------------------------------------------------------------ the console line
class NaNGradientIn(pl.Callback):
    """Puts a NaN into one parameter's gradient at the given optimizer steps (as a broken kernel would)."""

    def __init__(self, steps, param: str = "net.2.weight") -> None:
        self.steps, self.param = set(steps), param

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            dict(pl_module.named_parameters())[self.param].grad[0, 0] = math.nan


def guard_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lightning_optkit.callbacks.guard"]


@pytest.mark.parametrize("kind", ["adamw", "kit"])  # the host-sync path and a sync-free one
def test_a_skip_on_a_logging_step_is_one_line_naming_the_non_finite_tensor(kind, caplog, quiet_trainer_kwargs):
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=6, log_every_n_steps=1,
                         callbacks=[NaNGradientIn({2}), NonFiniteGuard()])
    with caplog.at_level("WARNING", logger="lightning_optkit"):
        trainer.fit(Regressor(kind), make_loader())
    assert guard_lines(caplog) == ["NonFiniteGuard: skipped optimizer step 2 (non-finite gradients in net.2.weight; "
                                   "1 in this fit); at most one such line per 60 s"]


@pytest.mark.parametrize("kind", ["adamw", "kit"])
def test_skips_are_rate_limited_and_summed_up_at_the_end(kind, caplog, quiet_trainer_kwargs):
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=8, log_every_n_steps=50,
                         callbacks=[NaNGradientIn({1, 3, 4}), NonFiniteGuard()])
    with caplog.at_level("WARNING", logger="lightning_optkit"):
        trainer.fit(Regressor(kind), make_loader())
    lines = guard_lines(caplog)
    if kind == "adamw":  # the guard reads each step: the first skip at once, the others held back
        assert lines == [
            "NonFiniteGuard: skipped optimizer step 1 (non-finite or spiking gradients; logging steps name the "
            "tensors; 1 in this fit); at most one such line per 60 s",
            "NonFiniteGuard: 3 optimizer steps skipped in this fit, 2 of them since the last message"]
    else:  # no host sync off logging steps: told at the end-of-training read, in one line
        assert lines == ["NonFiniteGuard: skipped 3 optimizer steps, between steps 0 and 8 (non-finite or spiking "
                         "gradients; logging steps name the tensors; 3 in this fit); at most one such line per 60 s"]


def test_without_the_rate_limit_every_skip_gets_its_line(caplog, quiet_trainer_kwargs):
    guard = NonFiniteGuard()
    guard.WARN_EVERY_S = 0.0
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=8, log_every_n_steps=1,
                         callbacks=[NaNGradientIn({1, 3, 4}), guard])
    with caplog.at_level("WARNING", logger="lightning_optkit"):
        trainer.fit(Regressor("kit"), make_loader())
    assert [line.split(" (")[0] for line in guard_lines(caplog)] == [
        f"NonFiniteGuard: skipped optimizer step {s}" for s in (1, 3, 4)]
