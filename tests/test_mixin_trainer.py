"""The mixin under a real lightning.Trainer: one optimizer (automatic) and two (GAN-style, manual)."""

from __future__ import annotations

import csv
import logging
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit import OptimizerMixin, OptimizerSpec, ParamGroup, SpecError


def loader(n: int = 64, batch: int = 8, dim: int = 4) -> DataLoader:
    x = torch.randn(n, dim)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch)


class Regressor(OptimizerMixin, L.LightningModule):
    def __init__(self, optim: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self.head(self.backbone(x)), y)


STEP_SPEC = {
    "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1,
    "groups": [{"params": "backbone.*", "name": "backbone", "lr_scale": 0.1}, {"params": "head.*", "name": "head"}],
    "schedule": {"class": "torch.optim.lr_scheduler.StepLR", "step_size": 1, "gamma": 0.5, "interval": "epoch"},
}


def test_single_optimizer_fit_builds_named_groups_and_steps_the_schedule(tmp_path, quiet_trainer_kwargs) -> None:
    model = Regressor(optim=STEP_SPEC)
    logger = CSVLogger(str(tmp_path), name="run")
    kwargs = {**quiet_trainer_kwargs, "logger": logger}
    trainer = L.Trainer(**kwargs, max_epochs=3, log_every_n_steps=1, callbacks=[LearningRateMonitor()])
    trainer.fit(model, loader())
    assert model.automatic_optimization
    (opt,) = trainer.optimizers
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"backbone", "backbone/no_decay", "head", "head/no_decay"}
    assert groups["backbone"]["params"] == [model.backbone[0].weight]
    assert groups["backbone/no_decay"]["params"] == [model.backbone[0].bias]
    assert groups["head"]["params"] == [model.head.weight]
    # three epochs of StepLR(gamma=0.5): every group's own base lr is halved three times
    assert groups["backbone"]["lr"] == pytest.approx(1e-3 * 0.5 ** 3)
    assert groups["head"]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    assert groups["head"]["weight_decay"] == 0.1 and groups["head/no_decay"]["weight_decay"] == 0.0
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        columns = next(csv.reader(fh))
    assert "lr-AdamW/backbone" in columns and "lr-AdamW/head/no_decay" in columns


def test_spec_from_hparams_is_saved_in_the_checkpoint_and_rebuilds(tmp_path, quiet_trainer_kwargs) -> None:
    model = Regressor(optim=STEP_SPEC)
    trainer = L.Trainer(**{**quiet_trainer_kwargs, "enable_checkpointing": True}, max_epochs=1)
    trainer.fit(model, loader())
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = Regressor.load_from_checkpoint(ckpt)
    assert restored.hparams["optim"] == STEP_SPEC
    trainer2 = L.Trainer(**quiet_trainer_kwargs, max_epochs=2)
    trainer2.fit(restored, loader(), ckpt_path=ckpt)
    assert {g["name"] for g in trainer2.optimizers[0].param_groups} == {"backbone", "backbone/no_decay", "head",
                                                                        "head/no_decay"}


def test_invalid_spec_fails_before_the_first_batch(quiet_trainer_kwargs) -> None:
    model = Regressor(optim={"optimizer": "adamw", "lr": 1e-3, "groups": [{"params": "backbone.9.*", "name": "x"}]})
    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=2)
    with pytest.raises(SpecError, match="backbone.9"):
        trainer.fit(model, loader())
    assert model.steps_run == 0


class TinyGAN(OptimizerMixin, L.LightningModule):
    """Generator and discriminator with their own optimizers and schedules, stepped by name."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.optim_spec = [
            OptimizerSpec("adam", lr=2e-3, betas=(0.5, 0.999), params="generator.*", name="gen",
                          schedule={"class": "torch.optim.lr_scheduler.StepLR", "step_size": 2, "gamma": 0.5,
                                    "interval": "step"}),
            OptimizerSpec("sgd", lr=1e-2, momentum=0.9, params="discriminator.*", name="disc",
                          groups=[ParamGroup("discriminator.2.*", name="last", lr_scale=0.5)],
                          schedule={"class": "torch.optim.lr_scheduler.StepLR", "step_size": 1, "gamma": 0.1,
                                    "interval": "epoch"}),
        ]

    def training_step(self, batch, batch_idx):
        (real,) = batch
        z = torch.randn(real.shape[0], 2)
        fake = self.generator(z)
        bce = nn.functional.binary_cross_entropy_with_logits
        d_loss = bce(self.discriminator(real), torch.ones(real.shape[0], 1)) + \
            bce(self.discriminator(fake.detach()), torch.zeros(real.shape[0], 1))
        self.manual_step(d_loss, optimizer="disc")
        g_loss = bce(self.discriminator(self.generator(z)), torch.ones(real.shape[0], 1))
        self.manual_step(g_loss, optimizer="gen")


def test_two_optimizers_run_in_manual_optimization_with_manual_step(quiet_trainer_kwargs) -> None:
    model = TinyGAN()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = DataLoader(TensorDataset(torch.randn(32, 4) + 2.0), batch_size=8)  # 4 batches per epoch
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=2)
    trainer.fit(model, data)
    assert model.automatic_optimization is False
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    gen, disc = trainer.optimizers
    assert isinstance(gen, torch.optim.Adam) and isinstance(disc, torch.optim.SGD)
    # gen: 8 optimizer steps, StepLR(step_size=2) per step -> 4 halvings
    assert gen.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.5 ** 4)
    # disc: stepped at the start of epoch 2 only (the end of the last epoch has no later step)
    by_name = {g["name"]: g["lr"] for g in disc.param_groups}
    assert by_name["default"] == pytest.approx(1e-2 * 0.1)
    assert by_name["last"] == pytest.approx(0.5e-2 * 0.1)


def test_manual_step_rejects_an_unknown_optimizer_name(quiet_trainer_kwargs) -> None:
    class Wrong(TinyGAN):
        def training_step(self, batch, batch_idx):
            self.manual_step(self.generator(torch.randn(2, 2)).sum(), optimizer="generator")

    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=1)
    with pytest.raises(SpecError, match=r"\['gen', 'disc'\]"):
        trainer.fit(Wrong(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))


def test_several_optimizers_with_accumulation_fail_before_training(quiet_trainer_kwargs) -> None:
    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=1, accumulate_grad_batches=2)
    with pytest.raises(MisconfigurationException, match="accumulation is not supported for manual"):
        trainer.fit(TinyGAN(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))


def test_plateau_scheduler_in_manual_optimization_reads_its_metric(quiet_trainer_kwargs) -> None:
    class PlateauGAN(TinyGAN):
        def __init__(self) -> None:
            super().__init__()
            self.optim_spec[1] = OptimizerSpec(
                "sgd", lr=1e-2, params="discriminator.*", name="disc",
                schedule={"class": "torch.optim.lr_scheduler.ReduceLROnPlateau", "monitor": "score", "patience": 0,
                          "factor": 0.5, "interval": "epoch"})

        def training_step(self, batch, batch_idx):
            self.log("score", float(self.current_epoch))  # gets worse every epoch in mode="min"
            super().training_step(batch, batch_idx)

    model = PlateauGAN()
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=3)
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=8))
    # stepped at the start of epochs 1 (score 0: best so far) and 2 (score 1: worse -> halve)
    assert trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.5e-2)


class DeterministicGAN(OptimizerMixin, L.LightningModule):
    """Latents come with the batch, so a resumed fit sees exactly the data of an uninterrupted one."""

    def __init__(self, schedule: dict, max_lr_steps: bool = False) -> None:
        super().__init__()
        self.generator = nn.Linear(2, 4)
        self.discriminator = nn.Linear(4, 1)
        self.optim_spec = [
            OptimizerSpec("sgd", lr=0.1, params="generator.*", name="gen", schedule=schedule),
            OptimizerSpec("sgd", lr=0.1, params="discriminator.*", name="disc", schedule=schedule),
        ]

    def training_step(self, batch, batch_idx):
        real, z = batch
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = bce(self.discriminator(real), ones) + bce(self.discriminator(self.generator(z).detach()), zeros)
        self.manual_step(d_loss, optimizer="disc")
        self.manual_step(bce(self.discriminator(self.generator(z)), ones), optimizer="gen")


def gan_data() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(32, 4) + 1.0, torch.randn(32, 2)), batch_size=8)  # 4 batches


def test_max_steps_counts_both_optimizers_and_schedules_span_the_fit(quiet_trainer_kwargs) -> None:
    model = DeterministicGAN({"name": "linear", "min_lr_ratio": 0.1})
    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=12, max_epochs=100)
    trainer.fit(model, gan_data())
    # 12 optimizer steps in all = 6 batches; each optimizer's linear schedule spans its own 6 steps
    assert trainer.global_step == 12
    for opt in trainer.optimizers:
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1)


def test_manual_epoch_schedulers_resume_exactly(tmp_path, quiet_trainer_kwargs) -> None:
    step_lr = {"class": "torch.optim.lr_scheduler.StepLR", "step_size": 1, "gamma": 0.5, "interval": "epoch"}
    torch.manual_seed(1)
    straight = DeterministicGAN(step_lr)
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    data = gan_data()
    L.Trainer(**quiet_trainer_kwargs, max_epochs=4).fit(straight, data)

    first = DeterministicGAN(step_lr)
    first.load_state_dict(start)
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=2)
    trainer.fit(first, data)
    trainer.save_checkpoint(tmp_path / "epoch2.ckpt")
    resumed = DeterministicGAN(step_lr)
    resumed_trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=4)
    resumed_trainer.fit(resumed, data, ckpt_path=tmp_path / "epoch2.ckpt")
    assert [o.param_groups[0]["lr"] for o in resumed_trainer.optimizers] == pytest.approx([0.1 * 0.5 ** 3] * 2)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_list_spec_with_a_training_step_that_returns_the_loss_fails_on_the_first_batch(quiet_trainer_kwargs):
    class ReturnsLoss(DeterministicGAN):
        def training_step(self, batch, batch_idx):
            real, z = batch
            return self.discriminator(self.generator(z)).mean()

    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=4)
    with pytest.raises(SpecError, match="manual_step"):
        trainer.fit(ReturnsLoss({"name": "constant"}), gan_data())


# ------------------------------------------------------------------ a hand-written configure_optimizers
class OwnConfigureOptimizers(Regressor):
    """A user's configure_optimizers on a module that also sets a spec: the spec would be dead configuration."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ExtendsConfigureOptimizers(Regressor):
    """An override that builds from the spec and adds to it (here: records the optimizer) uses the spec."""

    def configure_optimizers(self):
        result = super().configure_optimizers()
        self.built = result
        return result


def test_a_configure_optimizers_that_ignores_the_spec_fails_before_training(quiet_trainer_kwargs) -> None:
    model = OwnConfigureOptimizers(optim=STEP_SPEC)
    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=2)
    with pytest.raises(SpecError, match=r"configure_optimizers=.*ignores the optimizer spec.*"
                                        r"delete OwnConfigureOptimizers.configure_optimizers"):
        trainer.fit(model, loader())
    assert model.steps_run == 0


def test_a_configure_optimizers_that_calls_super_trains_from_the_spec(quiet_trainer_kwargs) -> None:
    model = ExtendsConfigureOptimizers(optim=STEP_SPEC)
    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=2)
    trainer.fit(model, loader())
    assert model.steps_run == 2
    assert {g["name"] for g in trainer.optimizers[0].param_groups} == {"backbone", "backbone/no_decay", "head",
                                                                       "head/no_decay"}
    with pytest.raises(SpecError, match="ignores the optimizer spec"):  # the same Trainer, now the wrong override
        trainer.fit(OwnConfigureOptimizers(optim=STEP_SPEC), loader())


# ------------------------------------------------------------------ validate() before fit()
class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Validated(Regressor):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.binary_cross_entropy_with_logits(self.head(self.backbone(x)), y))


def test_validate_before_fit_adds_no_confusing_override_message(quiet_trainer_kwargs) -> None:
    from lightning_optkit.callbacks import RestoreLoaderPosition

    records = Records()
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(records)
    try:
        model = Validated(optim={"optimizer": "adamw", "lr": 1e-2, "schedule": {"name": "cosine", "warmup": "10%"}})
        trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.validate(model, loader())
            trainer.fit(model, loader(), loader())
            trainer.validate(model, loader())
    finally:
        lightning_log.removeHandler(records)
    kit_names = ("RestoreLoaderPosition", "ManualStepCheck", "ScheduleFreeMode", "SpecInUseCheck")
    noisy = [line for line in records.lines + [str(w.message) for w in caught] if any(n in line for n in kit_names)]
    assert not noisy, noisy
    assert records.lines  # the handler does see Lightning's own info lines
    assert model.steps_run == 8
    assert sum(isinstance(cb, RestoreLoaderPosition) for cb in trainer.callbacks) == 1


def test_several_optimizers_are_still_checked_in_a_fit_after_validate(quiet_trainer_kwargs) -> None:
    class ReturnsLoss(DeterministicGAN):
        def training_step(self, batch, batch_idx):
            real, z = batch
            return self.discriminator(self.generator(z)).mean()

        def validation_step(self, batch, batch_idx):
            self.log("v", self.discriminator(batch[0]).mean())

    model = ReturnsLoss({"name": "constant"})
    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=4)
    trainer.validate(model, gan_data())
    with pytest.raises(SpecError, match="manual_step"):
        trainer.fit(model, gan_data())
