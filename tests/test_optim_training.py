"""Kit optimizers in real Lightning fits, on Rosenbrock, the Muon+AdamW chain, and ScheduleFreeMode."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.types import Optimizable
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit.callbacks.schedulefree import ScheduleFreeMode
from lightning_optkit.optim.adan import Adan
from lightning_optkit.optim.chained import ChainedOptimizer
from lightning_optkit.optim.lamb import LAMB
from lightning_optkit.optim.lion import Lion
from lightning_optkit.optim.momentum_sgd import MomentumSGD
from lightning_optkit.optim.schedulefree import ScheduleFreeAdamW


def regression_data(n: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 8, generator=gen)
    y = torch.tanh(x @ torch.randn(8, 1, generator=gen)) + 0.05 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y)


class Regressor(pl.LightningModule):
    """A small MLP recording its training losses; ``make_optimizer(module)`` builds the optimizer."""

    def __init__(self, make_optimizer) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 32)
        self.hidden = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 1)
        self.make_optimizer = make_optimizer
        self.losses: list[float] = []
        self.val_saw_train_mode: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        optimizers = self.trainer.optimizers
        if optimizers and isinstance(optimizers[0], ScheduleFreeAdamW):
            self.val_saw_train_mode.append(optimizers[0].train_mode)
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return self.make_optimizer(self)

    def train_dataloader(self):
        return DataLoader(regression_data(), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(regression_data(32), batch_size=32)


FITS = [
    (MomentumSGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (Lion, dict(lr=3e-3)),
    (LAMB, dict(lr=2e-2)),
    (Adan, dict(lr=1e-2)),
    (ScheduleFreeAdamW, dict(lr=1e-2, warmup_steps=5)),
]


@pytest.mark.parametrize(("cls", "kwargs"), FITS, ids=[c.__name__ for c, _ in FITS])
def test_trainer_fit_lowers_the_loss(cls, kwargs, quiet_trainer_kwargs) -> None:
    model = Regressor(lambda m: cls(m.parameters(), **kwargs))
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=40, limit_val_batches=0,
                         callbacks=[ScheduleFreeMode()])
    trainer.fit(model)
    assert len(model.losses) == 40
    first, last = sum(model.losses[:4]) / 4, sum(model.losses[-4:]) / 4
    assert last < 0.5 * first, (first, last)


def rosenbrock(p: torch.Tensor) -> torch.Tensor:
    return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


# (class, kwargs, decay the lr linearly to 0 over the run). Schedule-free needs no schedule.
ROSENBROCK = [
    (MomentumSGD, dict(lr=1e-3, momentum=0.9), True),
    (MomentumSGD, dict(lr=1e-3, momentum=0.9, nesterov=True), True),
    (Lion, dict(lr=1e-2), True),
    (LAMB, dict(lr=5e-2, weight_decay=0.0), True),
    (Adan, dict(lr=2e-2), True),
    (ScheduleFreeAdamW, dict(lr=0.1, r=2.0, warmup_steps=100), False),
]


@pytest.mark.parametrize(("cls", "kwargs", "decay"), ROSENBROCK, ids=lambda v: getattr(v, "__name__", ""))
def test_converges_on_rosenbrock(cls, kwargs, decay) -> None:
    """From (-1.5, 2) in 2000 steps to within 0.05 (Euclidean) of the minimum (1, 1)."""
    steps = 2000
    p = torch.nn.Parameter(torch.tensor([-1.5, 2.0]))
    optimizer = cls([p], **kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / steps if decay else 1.0)
    for _ in range(steps):
        optimizer.zero_grad()
        rosenbrock(p).backward()
        optimizer.step()
        schedule.step()
    if isinstance(optimizer, ScheduleFreeAdamW):
        optimizer.eval()
    distance = (p.detach() - torch.tensor([1.0, 1.0])).norm()
    assert distance < 0.05, p


def muon_adamw_chain(module: Regressor):
    hidden = [module.hidden.weight]
    rest = [p for name, p in module.named_parameters() if name != "hidden.weight"]
    chain = ChainedOptimizer([
        torch.optim.Muon(hidden, lr=0.02, weight_decay=0.0),
        torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.0),
    ])
    schedule = torch.optim.lr_scheduler.LambdaLR(chain, lambda k: 1.0 / (1.0 + 0.1 * k))
    return {"optimizer": chain, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_chain_of_muon_and_adamw_trains_under_one_schedule(quiet_trainer_kwargs) -> None:
    model = Regressor(muon_adamw_chain)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=30, limit_val_batches=0)
    trainer.fit(model)
    chain = trainer.optimizers[0]
    assert isinstance(chain, ChainedOptimizer) and isinstance(chain, Optimizable)
    muon, adamw = chain.optimizers
    factor = 1.0 / (1.0 + 0.1 * 30)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.02 * factor)
    assert adamw.param_groups[0]["lr"] == pytest.approx(1e-2 * factor)
    assert muon.param_groups[0] is chain.param_groups[0] and adamw.param_groups[0] is chain.param_groups[1]
    assert len(muon.state) == 1 and len(adamw.state) == 5  # both members stepped
    first, last = sum(model.losses[:4]) / 4, sum(model.losses[-4:]) / 4
    assert last < 0.5 * first, (first, last)


def test_chain_state_dict_round_trip_and_errors() -> None:
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def build(net_a, net_b):
        return ChainedOptimizer([torch.optim.Muon([net_a.weight], lr=0.02),
                                 torch.optim.AdamW([net_a.bias, *net_b.parameters()], lr=1e-2)])

    chain = build(a, b)
    x = torch.randn(8, 4)

    def step(opt, net_a, net_b):
        opt.zero_grad()
        loss = net_b(net_a(x)).pow(2).mean()
        loss.backward()
        return opt.step()

    for _ in range(3):
        step(chain, a, b)
    saved = copy.deepcopy(chain.state_dict())  # torch shares state tensors with the live optimizer
    a2, b2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    restored = build(a2, b2)
    restored.load_state_dict(saved)
    for _ in range(3):
        step(chain, a, b)
        step(restored, a2, b2)
    for p, q in zip([*a.parameters(), *b.parameters()], [*a2.parameters(), *b2.parameters()]):
        assert torch.equal(p, q)

    def closure():
        chain.zero_grad()
        loss = b(a(x)).pow(2).mean()
        loss.backward()
        return loss

    with torch.no_grad():
        assert isinstance(chain.step(closure), torch.Tensor)
    with pytest.raises(ValueError, match="expects .*2 entries"):
        chain.load_state_dict({"members": [saved["members"][0]]})
    with pytest.raises(ValueError, match="shares a parameter"):
        ChainedOptimizer([torch.optim.SGD(a.parameters()), torch.optim.SGD(a.parameters())])
    with pytest.raises(TypeError, match="add the group to one of chain.optimizers"):
        chain.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_schedulefree_mode_validates_and_checkpoints_at_x(quiet_trainer_kwargs, tmp_path) -> None:
    model = Regressor(lambda m: ScheduleFreeAdamW(m.parameters(), lr=1e-2))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=False)
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True}
    trainer = pl.Trainer(**kwargs, max_epochs=2, num_sanity_val_steps=0, callbacks=[ScheduleFreeMode(), checkpoint])
    trainer.fit(model)
    optimizer = trainer.optimizers[0]

    assert model.val_saw_train_mode == [False, False]  # validation ran at x, twice
    assert not optimizer.train_mode  # training ended: the model holds x

    # The checkpoint (saved after the last validation, when training had switched back to y)
    # holds x, which is what the model holds now (up to the rounding of one y -> x -> y round trip,
    # far below the y - x gap checked next).
    ckpt = torch.load(checkpoint.best_model_path, weights_only=False)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ckpt["state_dict"][name], value, rtol=0, atol=1e-6)
    assert all(not g["train_mode"] for g in ckpt["optimizer_states"][0]["param_groups"])
    optimizer.train()
    assert (ckpt["state_dict"]["hidden.weight"] - model.hidden.weight).abs().max() > 1e-4
    optimizer.eval()

    # Resuming switches back to y before the first step (a step in eval mode would raise).
    resumed = Regressor(lambda m: ScheduleFreeAdamW(m.parameters(), lr=1e-2))
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_epochs=3, num_sanity_val_steps=0,
                         callbacks=[ScheduleFreeMode()])
    trainer.fit(resumed, ckpt_path=checkpoint.best_model_path)
    assert len(resumed.losses) == 4 and resumed.val_saw_train_mode == [False]
