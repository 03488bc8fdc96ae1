"""What GradientClipping and NonFiniteGuard log: one row per logging step, values users can monitor."""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from test_clipping import Regressor, hand_loop, make_loader

from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard

KEYS = ("grad_clip/total_norm", "grad_clip/clip_coef", "guard/skipped_steps", "guard/consecutive_skips")


def read_rows(logger: CSVLogger) -> list[dict[str, float]]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_clip_and_guard_write_one_row_per_logging_step_with_the_pre_clip_norm(tmp_path, quiet_trainer_kwargs):
    torch.manual_seed(0)
    loader = make_loader()
    model = Regressor("adam")
    reference = copy.deepcopy(model.net)
    logger = CSVLogger(str(tmp_path))
    trainer = pl.Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=6, log_every_n_steps=2,
                         callbacks=[GradientClipping(max_norm=0.5), NonFiniteGuard()])
    trainer.fit(model, loader)
    norms = hand_loop(reference, loader, "adam", lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5), steps=6)
    assert max(norms) > 0.5, "the test must actually clip"

    rows = read_rows(logger)
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # Lightning's logging steps, one row each
    for row in rows:
        assert set(KEYS) <= set(row)
        norm = norms[int(row["step"])]
        assert row["grad_clip/total_norm"] == pytest.approx(norm, rel=1e-5)
        assert row["grad_clip/clip_coef"] == pytest.approx(min(1.0, 0.5 / (norm + 1e-6)), rel=1e-5)
        assert row["guard/skipped_steps"] == 0 and row["guard/consecutive_skips"] == 0
    for key in KEYS:  # the latest values are in callback_metrics, as with self.log
        assert trainer.callback_metrics[key].item() == pytest.approx(rows[-1][key], rel=1e-6)


def test_lightning_callbacks_can_monitor_the_logged_norm(quiet_trainer_kwargs):
    """EarlyStopping reads trainer.callback_metrics: the clip norm is there for it."""
    stop = EarlyStopping(monitor="grad_clip/total_norm", mode="min", stopping_threshold=1e9,
                         check_on_train_epoch_end=True)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_epochs=5, log_every_n_steps=1,
                         callbacks=[GradientClipping(max_norm=0.5), stop])
    trainer.fit(Regressor(), make_loader())
    assert trainer.current_epoch == 1 and stop.stopped_epoch == 0  # stopped after the first epoch's check


class ReadsNormAtBatchEnd(pl.Callback):
    """A user's callback, listed before the clipping callback, acting on the logged norm at batch end."""

    def __init__(self) -> None:
        self.seen: list[float | None] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get("grad_clip/total_norm")
        self.seen.append(None if value is None else value.item())


def test_values_are_visible_to_callbacks_later_in_the_same_batch(quiet_trainer_kwargs):
    torch.manual_seed(0)
    loader = make_loader()
    model = Regressor("sgd")
    reference = copy.deepcopy(model.net)
    reader = ReadsNormAtBatchEnd()
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=4, log_every_n_steps=1,
                         callbacks=[reader, GradientClipping(max_norm=0.5)])
    trainer.fit(model, loader)
    norms = hand_loop(reference, loader, "sgd", lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5), steps=4)
    assert reader.seen == pytest.approx(norms, rel=1e-5)  # this step's norm, not the previous one
    assert set(KEYS[:2]) <= set(trainer.logged_metrics)


class StopsAfterTheStep(pl.Callback):
    """Stops the fit from on_train_batch_end, as Lightning's Timer does, on a batch that would not log."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            trainer.should_stop = True


@pytest.mark.parametrize("stopper_first", [True, False])
def test_a_stop_decided_after_the_step_still_writes_that_batchs_row(tmp_path, quiet_trainer_kwargs, stopper_first):
    torch.manual_seed(0)
    loader = make_loader()
    model = Regressor("sgd")
    reference = copy.deepcopy(model.net)
    logger = CSVLogger(str(tmp_path))
    kit = [GradientClipping(max_norm=0.5), NonFiniteGuard()]
    callbacks = [StopsAfterTheStep(), *kit] if stopper_first else [*kit, StopsAfterTheStep()]
    trainer = pl.Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=20, log_every_n_steps=50,
                         callbacks=callbacks)
    trainer.fit(model, loader)
    norms = hand_loop(reference, loader, "sgd", lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5), steps=3)
    rows = read_rows(logger)
    assert [int(r["step"]) for r in rows] == [2]  # one row, at the stop batch, as Lightning logs it
    assert set(KEYS) <= set(rows[0])
    assert rows[0]["grad_clip/total_norm"] == pytest.approx(norms[2], rel=1e-5)
    assert trainer.callback_metrics["grad_clip/total_norm"].item() == pytest.approx(norms[2], rel=1e-5)


class AlternatingTwoOptimizers(pl.LightningModule):
    """Manual optimization: ``a`` steps every batch, ``b`` on even batches only."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for opt, net in ((opt_a, self.a), (opt_b, self.b)):
            if net is self.b and batch_idx % 2:
                continue
            opt.zero_grad()
            self.manual_backward(torch.nn.functional.mse_loss(net(x), y))
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.Adam(self.b.parameters())]


class StopsAtBatch(pl.Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            trainer.should_stop = True


def test_the_stop_row_holds_only_the_optimizers_that_stepped_in_that_batch(tmp_path, quiet_trainer_kwargs):
    logger = CSVLogger(str(tmp_path))
    trainer = pl.Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_epochs=1, log_every_n_steps=50,
                         callbacks=[GradientClipping(max_norm=0.5), NonFiniteGuard(), StopsAtBatch(3)])
    trainer.fit(AlternatingTwoOptimizers(), make_loader())
    rows = read_rows(logger)
    keys = set().union(*rows)
    assert {int(r["step"]) for r in rows} == {3}
    assert {"grad_clip/SGD/total_norm", "guard/SGD/skipped_steps"} <= keys
    assert not any("/Adam/" in k for k in keys), keys  # Adam last stepped at batch 2: no stale value


class LogsItsLoss(Regressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss)
        return loss


@pytest.mark.parametrize("stopper_first", [True, False])
def test_rows_follow_lightnings_own_when_min_steps_overrides_a_stop(tmp_path, quiet_trainer_kwargs, stopper_first):
    logger = CSVLogger(str(tmp_path))
    kit = [GradientClipping(max_norm=0.5), NonFiniteGuard()]
    stopper = StopsAtBatch(1)
    callbacks = [stopper, *kit] if stopper_first else [*kit, stopper]
    trainer = pl.Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=20, min_steps=4,
                         log_every_n_steps=50, callbacks=callbacks)
    trainer.fit(LogsItsLoss("sgd"), make_loader())
    rows = read_rows(logger)
    lightning_steps = sorted({int(r["step"]) for r in rows if "loss" in r})
    kit_steps = sorted({int(r["step"]) for r in rows if "grad_clip/total_norm" in r})
    guard_steps = sorted({int(r["step"]) for r in rows if "guard/skipped_steps" in r})
    assert lightning_steps and lightning_steps[0] == 1
    if stopper_first:  # the stop is known when the kit's batch-end hooks run
        assert kit_steps == guard_steps == lightning_steps
    else:  # the batch the stop was decided on comes too late; every later one matches
        assert kit_steps == guard_steps == [s for s in lightning_steps if s != 1]


# ------------------------------------------------------------------ one CSV row per step, with the epoch
def read_raw_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


class LogsLossAndValidates(LogsItsLoss):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))


@pytest.mark.parametrize(("user_logs", "monitor_every"), [(True, None), (False, None), (True, 3)])
def test_every_logging_step_is_one_csv_row_with_its_epoch(tmp_path, quiet_trainer_kwargs, user_logs, monitor_every):
    """The kit's values join Lightning's own row for the step (the user's self.log values and the epoch)."""
    from lightning_optkit.callbacks.monitor import OptimizerMonitor

    logger = CSVLogger(str(tmp_path))
    model = LogsLossAndValidates("adam") if user_logs else Regressor("adam")
    callbacks = [GradientClipping(max_norm=0.5), NonFiniteGuard(), OptimizerMonitor(every_n_steps=monitor_every)]
    loader = make_loader()
    trainer = pl.Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_epochs=2, log_every_n_steps=2,
                         callbacks=callbacks)
    trainer.fit(model, loader, loader if user_logs else None)
    per_epoch = len(loader)
    rows = read_raw_rows(logger)
    assert all(row["epoch"] != "" for row in rows), rows  # every row says its epoch
    train_rows = [row for row in rows if row.get("val_loss", "") == ""]
    steps = [int(row["step"]) for row in train_rows]
    assert len(steps) == len(set(steps)), steps  # one row per step
    clip_steps = [s for s in range(2 * per_epoch) if (s + 1) % 2 == 0]
    monitor_steps = [s for s in range(2 * per_epoch) if (s + 1) % (monitor_every or 2) == 0]
    assert steps == sorted(set(clip_steps) | set(monitor_steps))
    for row in train_rows:
        step = int(row["step"])
        assert int(float(row["epoch"])) == step // per_epoch
        assert (row["grad_clip/clip_coef"] != "") == (step in clip_steps)
        assert (row["guard/skipped_steps"] != "") == (step in clip_steps)
        assert (row["grad_norm/total"] != "") == (step in monitor_steps)
        if user_logs:
            assert (row["loss"] != "") == (step in clip_steps)  # Lightning's own values, in the same row
    if user_logs:  # Lightning's validation rows stay its own, at the step of the epoch's last batch
        val_steps = [int(row["step"]) for row in rows if row.get("val_loss", "") != ""]
        assert val_steps == [per_epoch * e - 1 for e in (1, 2)]


@pytest.mark.parametrize("exclude", [(), ("net.2",)])
def test_the_pre_clip_norm_is_logged_once_by_its_owner(tmp_path, quiet_trainer_kwargs, exclude):
    """With OptimizerMonitor, grad_norm/total is the pre-clip norm; GradientClipping logs its total_norm only
    when it is a different number (here: with exclude=, the norm of the parameters it clips)."""
    from lightning_optkit.callbacks.monitor import OptimizerMonitor

    logger = CSVLogger(str(tmp_path))
    trainer = pl.Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=4, log_every_n_steps=2,
                         callbacks=[GradientClipping(max_norm=0.5, exclude=exclude), OptimizerMonitor()])
    trainer.fit(Regressor("sgd"), make_loader())
    rows = read_rows(logger)
    assert [int(r["step"]) for r in rows] == [1, 3]
    for row in rows:
        assert "grad_norm/clip_coef" not in row  # grad_clip/clip_coef is the coefficient
        assert row["grad_clip/clip_coef"] == pytest.approx(
            min(1.0, 0.5 / ((row["grad_clip/total_norm"] if exclude else row["grad_norm/total"]) + 1e-6)), rel=1e-5)
        if exclude:
            assert row["grad_clip/total_norm"] < row["grad_norm/total"]
        else:
            assert "grad_clip/total_norm" not in row
    norm = trainer.callback_metrics["grad_clip/total_norm"].item()  # still there for EarlyStopping & co.
    assert norm == pytest.approx(rows[-1]["grad_clip/total_norm" if exclude else "grad_norm/total"], rel=1e-6)
