"""Kit schedules inside real Lightning fits: duration resolution, peak/end, resume, plateau."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit.durations import trainer_totals
from lightning_optkit.errors import SpecError
from lightning_optkit.schedules import Schedule

BASES = (0.05, 0.01)


class TwoGroupModule(L.LightningModule):
    """A tiny regression model whose two layers have different base lrs."""

    def __init__(self, schedule: Schedule, val_metric: str | None = None) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 4)
        self.tail = torch.nn.Linear(4, 1)
        self.schedule = schedule
        self.val_metric = val_metric

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.tail(self.head(x)), y)

    def validation_step(self, batch, batch_idx):
        if self.val_metric:
            self.log(self.val_metric, torch.tensor(1.0))  # never improves after the first result

    def configure_optimizers(self):
        opt = torch.optim.SGD([{"params": self.head.parameters(), "lr": BASES[0]},
                               {"params": self.tail.parameters(), "lr": BASES[1]}])
        return {"optimizer": opt, "lr_scheduler": self.schedule.create(opt, self.trainer, name="lr")}


class RecordLR(Callback):
    """The lr of every group used by each optimizer step, keyed by global step."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs[trainer.global_step] = [g["lr"] for g in optimizer.param_groups]


def loader(batches: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(batches, 3), torch.randn(batches, 1)), batch_size=1)


class _Stop(Exception):
    pass


class _Probe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        self.totals = trainer_totals(self.trainer)
        raise _Stop


@pytest.mark.parametrize(
    ("trainer_kwargs", "expected"),
    [
        ({"accumulate_grad_batches": 4, "max_epochs": 3}, (18, 6)),  # ceil(22 / 4) = 6 per epoch
        ({"accumulate_grad_batches": 4, "max_epochs": 3, "limit_train_batches": 0.5}, (9, 3)),
        ({"max_steps": 7}, (7, 22)),
        ({"max_epochs": -1}, (None, 22)),
        ({"max_epochs": -1, "max_steps": 50}, (50, 22)),
    ],
)
def test_trainer_totals_inside_configure_optimizers(quiet_trainer_kwargs, trainer_kwargs, expected) -> None:
    module = _Probe()
    with pytest.raises(_Stop):
        L.Trainer(**quiet_trainer_kwargs, **trainer_kwargs).fit(module, loader(22))
    assert module.totals == expected


def test_cosine_warmup_peaks_and_ends_where_the_arithmetic_says(quiet_trainer_kwargs) -> None:
    """22 batches, accumulate 4: 6 optimizer steps per epoch, 18 in 3 epochs; warmup 10% -> 2 steps."""
    schedule = Schedule("cosine", warmup="10%", min_lr_ratio=0.1)
    record = RecordLR()
    module = TwoGroupModule(schedule)
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=3, accumulate_grad_batches=4, callbacks=[record])
    trainer.fit(module, loader(22))
    assert trainer.global_step == 18 and sorted(record.lrs) == list(range(18))
    total, warmup = 18, round(0.1 * 18)
    for step, lrs in record.lrs.items():
        if step < warmup:
            factor = step / warmup
        else:
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert lrs == pytest.approx([b * factor for b in BASES], abs=1e-12), step
    peak = max(record.lrs, key=lambda s: record.lrs[s][0])
    assert peak == warmup and record.lrs[peak] == pytest.approx(list(BASES))
    final = [g["lr"] for g in trainer.optimizers[0].param_groups]  # after the last scheduler step
    assert final == pytest.approx([0.1 * b for b in BASES], abs=1e-15)


def test_resume_from_checkpoint_gives_the_same_lrs(quiet_trainer_kwargs, tmp_path) -> None:
    schedule = Schedule("cosine", warmup=3, warmup_start_factor=0.1, min_lr_ratio=0.05)
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True, "max_steps": 12}

    full = RecordLR()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    L.Trainer(**kwargs, callbacks=[full, saver]).fit(TwoGroupModule(schedule), loader(8))
    ckpt = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    assert ckpt.is_file()

    resumed = RecordLR()
    trainer = L.Trainer(**kwargs, callbacks=[resumed])
    trainer.fit(TwoGroupModule(schedule), loader(8), ckpt_path=str(ckpt))
    assert sorted(resumed.lrs) == list(range(5, 12))
    for step in range(5, 12):
        assert resumed.lrs[step] == full.lrs[step], step
    assert len({tuple(v) for v in full.lrs.values()}) > 8  # the lr really changes along the fit


def test_plateau_warmup_runs_per_step_and_reacts_once_per_validation(quiet_trainer_kwargs) -> None:
    """4 batches per epoch, validation after each epoch logging a value that never improves."""
    schedule = Schedule("plateau", monitor="val_score", warmup=4, patience=0, factor=0.5)
    record = RecordLR()
    module = TwoGroupModule(schedule, val_metric="val_score")
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=3, callbacks=[record], num_sanity_val_steps=0,
                        limit_val_batches=1)
    trainer.fit(module, loader(4), loader(2))
    factors = [record.lrs[s][0] / BASES[0] for s in sorted(record.lrs)]
    # warmup per step before any validation; the 1st result sets the best, the 2nd (no better) halves the
    # lr once, applied from the 2nd step after that validation; stale values in between change nothing
    assert factors == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step" and not config.reduce_on_plateau and config.monitor == "val_score"


def test_plateau_strict_missing_monitor_fails_clearly(quiet_trainer_kwargs) -> None:
    schedule = Schedule("plateau", monitor="val_typo", patience=0)
    module = TwoGroupModule(schedule, val_metric="val_score")
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=2, num_sanity_val_steps=0, limit_val_batches=1)
    with pytest.raises(SpecError, match="val_typo.*available: .*val_score"):
        trainer.fit(module, loader(2), loader(1))


def test_fraction_on_infinite_fit_fails_with_spec_error(quiet_trainer_kwargs) -> None:
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=-1)
    with pytest.raises(SpecError, match="training length is unknown") as info:
        trainer.fit(TwoGroupModule(Schedule("constant", warmup="5%")), loader(4))
    assert info.value.field == "schedule.warmup"
