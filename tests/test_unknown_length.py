"""A schedule needing the fit's length where it is unknown: each way it can be unknown, through real fits, gets a
SpecError before the first batch whose fix names what the user can change there; following the fix trains."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_optkit import OptimizerMixin, SpecError, build_optimizers


class Stream(IterableDataset):
    """Six samples with no ``__len__``, as a streaming dataset."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            yield torch.randn(4, generator=g)


class SizedStream(Stream):
    def __len__(self) -> int:
        return 6


class Net(OptimizerMixin, L.LightningModule):
    def __init__(self, optim: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lin = nn.Linear(4, 1)
        self.batches = 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        return self.lin(batch[0] if isinstance(batch, list) else batch).pow(2).mean()


def _spec(**schedule) -> dict:
    return {"optimizer": "sgd", "lr": 0.1, "schedule": {"name": "cosine", **schedule}}


SIZED = DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=2)


def _fails(quiet_trainer_kwargs, schedule: dict, loader, **trainer_kwargs) -> SpecError:
    model = Net(_spec(**schedule))
    with pytest.raises(SpecError) as err:
        L.Trainer(**quiet_trainer_kwargs, **trainer_kwargs).fit(model, loader)
    assert model.batches == 0  # refused before the first batch
    return err.value


def _trains(quiet_trainer_kwargs, schedule: dict, loader, **trainer_kwargs) -> int:
    model = Net(_spec(**schedule))
    L.Trainer(**quiet_trainer_kwargs, **trainer_kwargs).fit(model, loader)
    return model.batches


@pytest.mark.parametrize("field, schedule", [("schedule.total", {}), ("schedule.warmup", {"warmup": "25%"})])
def test_fraction_on_an_unsized_loader_with_finite_max_epochs_names_the_loader_length(
        quiet_trainer_kwargs, field, schedule):
    err = _fails(quiet_trainer_kwargs, schedule, DataLoader(Stream(), batch_size=2), max_epochs=2)
    assert err.field == field
    assert "Trainer(max_epochs=2) counts epochs, but the train dataloader has no length" in err.problem
    assert "__len__" in err.fix and "max_steps" in err.fix and "limit_train_batches" in err.fix
    assert "max_epochs" not in err.fix  # already set: not the missing piece


@pytest.mark.parametrize("fix, loader, trainer_kwargs, batches", [
    ("a __len__", DataLoader(SizedStream(), batch_size=2), {"max_epochs": 2}, 6),
    ("max_steps", DataLoader(Stream(), batch_size=2), {"max_epochs": 2, "max_steps": 4}, 4),
    ("limit_train_batches", DataLoader(Stream(), batch_size=2), {"max_epochs": 2, "limit_train_batches": 2}, 4),
])
def test_each_fix_of_the_unsized_loader_message_trains(quiet_trainer_kwargs, fix, loader, trainer_kwargs, batches):
    assert _trains(quiet_trainer_kwargs, {"warmup": "25%"}, loader, **trainer_kwargs) == batches


def test_endless_fit_on_a_sized_loader_names_max_steps_or_max_epochs(quiet_trainer_kwargs):
    err = _fails(quiet_trainer_kwargs, {}, SIZED, max_epochs=-1)
    assert err.field == "schedule.total" and "max_epochs=-1, max_steps=-1) trains until stopped" in err.problem
    assert err.fix.startswith("set Trainer(max_steps=...) or a finite max_epochs")
    assert "__len__" not in err.fix


def test_max_time_alone_names_max_steps(quiet_trainer_kwargs):
    err = _fails(quiet_trainer_kwargs, {"warmup": "10%"}, SIZED, max_time="00:00:01:00")
    assert "Trainer(max_time=...) stops on the clock, which counts no steps" in err.problem
    assert "max_steps" in err.fix


def test_endless_fit_on_an_unsized_loader_names_max_steps_only(quiet_trainer_kwargs):
    err = _fails(quiet_trainer_kwargs, {}, DataLoader(Stream(), batch_size=2), max_epochs=-1)
    assert "the train dataloader has no length" in err.problem
    assert err.fix.startswith("set Trainer(max_steps=...) (a finite max_epochs is not enough")


@pytest.mark.parametrize("field, schedule", [
    ("schedule.warmup", {"warmup": "1ep", "total": 4}),
    ("schedule.interval", {"interval": "epoch", "total": 2}),
])
def test_epochs_of_an_unsized_loader_name_the_loader_length_not_max_steps(quiet_trainer_kwargs, field, schedule):
    err = _fails(quiet_trainer_kwargs, schedule, DataLoader(Stream(), batch_size=2), max_steps=4)
    assert err.field == field and "the train dataloader has no length" in err.problem
    assert "__len__" in err.fix and "limit_train_batches" in err.fix
    assert "max_steps" not in err.fix  # set already; it does not give an epoch a length
    assert ("interval='step'" if field == "schedule.interval" else "in steps") in err.fix


def test_no_trainer_names_the_trainer_argument():
    with pytest.raises(SpecError, match="no trainer was given") as err:
        build_optimizers(nn.Linear(4, 1), _spec(warmup="10%"))
    assert "trainer=self.trainer" in err.value.fix
