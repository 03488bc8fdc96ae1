"""Train one model with the same data under DDP or FSDP2 (2 CPU processes, gloo); save what the tests compare.

Usage: python run_sharded.py <ddp|fsdp> <out dir> [config names...]. Each config (see CONFIGS) runs
one 20-step fit (two epochs); rank 0 saves the full parameters (DTensors gathered with ``full_tensor()``), every
rank saves its own guard counters and the skip it saw at the NaN step, and the CSV logger holds the
logged norms. Under FSDP2 each Linear and LayerNorm is ``fully_shard``-ed, with sizes that split
unevenly (13 rows over 2 ranks; the head's single row leaves rank 1 an empty shard).

``fsdp`` also runs ``killed`` (adamw_norm SIGKILLed at step 13, after distributed checkpoints at steps 6
and 12), ``resume`` (that run resumed from the step-12 checkpoint, mid-epoch, to step 20) and ``syncs``
(every torch call inside each optimizer step recorded with a TorchFunctionMode). Lightning launches
rank 1 by re-running this command, so everything runs under ``__main__``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for ddp_helpers and torch_calls

from ddp_helpers import KillAt, ResumableLoader, ResumableSampler  # noqa: E402
from torch_calls import HOST_TRANSFERS, TorchCalls  # noqa: E402,F401 (HOST_TRANSFERS: read by test_fsdp2)

from lightning_optkit import OptimizerMixin  # noqa: E402
from lightning_optkit.callbacks import GradientClipping, NonFiniteGuard, OptimizerMonitor  # noqa: E402

STEPS = 20
EPOCH = 8  # steps per epoch
KILL_AT, CKPT_EVERY = 13, 6  # the killed run dies at step 13, after checkpoints at steps 6 and 12 (mid-epoch 1)
NAN_STEP = 7  # the step whose gradient gets a NaN on rank 1 only
SCHEDULE = {"name": "cosine", "warmup": "20%"}

# name -> (optimizer spec, callbacks factory, inject a NaN at NAN_STEP)
CONFIGS: dict[str, tuple[dict[str, Any], Any, bool]] = {
    "adamw_norm": ({"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.01, "schedule": SCHEDULE},
                   lambda: [GradientClipping(max_norm=0.3), NonFiniteGuard(), OptimizerMonitor(every_n_steps=4)],
                   True),
    "fused_adamw": ({"optimizer": "fused_adamw", "lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": 0.3,
                     "schedule": SCHEDULE}, lambda: [NonFiniteGuard()], True),
    "lion_agc": ({"optimizer": "lion", "lr": 1e-3, "weight_decay": 0.01},
                 lambda: [GradientClipping(algorithm="agc", clip_factor=0.02)], False),
    "lamb_value": ({"optimizer": "lamb", "lr": 1e-2, "weight_decay": 0.01},
                   lambda: [GradientClipping(algorithm="value", max_value=0.02)], False),
    "adan_zscore": ({"optimizer": "adan", "lr": 1e-2},
                    lambda: [GradientClipping(algorithm="zscore", warmup_steps=4, z_thresh=1.0),
                             OptimizerMonitor(every_n_steps=4)], False),
    "sgd_quantile_group": ({"optimizer": "momentum_sgd", "lr": 5e-2, "momentum": 0.9,
                            "groups": [{"params": "head.*", "name": "head", "lr_scale": 0.5}]},
                           lambda: [GradientClipping(algorithm="quantile", quantile=0.5, warmup_steps=4),
                                    GradientClipping(max_norm=0.2, per="group")], False),
    "schedulefree": ({"optimizer": "schedulefree_adamw", "lr": 1e-2, "warmup_steps": 4},
                     lambda: [GradientClipping(max_norm=0.3, per="param")], False),
    # two optimizers, manual optimization (manual_step): global_step counts both, so 10 batches
    "manual_two": ([{"optimizer": "adamw", "lr": 1e-2, "params": "blocks.*", "name": "body"},
                    {"optimizer": "lion", "lr": 1e-3, "name": "rest"}],
                   lambda: [GradientClipping(max_norm=0.3), NonFiniteGuard(), OptimizerMonitor(every_n_steps=2)],
                   False),
}


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(EPOCH * 8, 6, generator=g)
    y = torch.sin(x @ torch.randn(6, 1, generator=g))
    return TensorDataset(x, y)


def loader(rank: int) -> DataLoader:
    """Rank ``rank``'s half of every global batch of 8, shuffled per epoch; resumes mid-epoch exactly."""
    return ResumableLoader(dataset(), batch_size=4, sampler=ResumableSampler(EPOCH * 8, 4, rank, 2), drop_last=True)


class ShardNet(OptimizerMixin, L.LightningModule):
    """An MLP with LayerNorms whose layers FSDP2 shards one by one (``sharded``), else DDP trains it."""

    def __init__(self, optim: dict[str, Any], sharded: bool, nan: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.optim_spec = optim
        self.sharded, self.nan = sharded, nan
        self.inp = nn.Linear(6, 13)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(13), nn.Linear(13, 13)) for _ in range(2))
        self.head = nn.Linear(13, 1)
        self.skips: dict[int, bool] = {}

    def configure_model(self) -> None:
        if not self.sharded:
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            fully_shard(block[0], mesh=mesh)
            fully_shard(block[1], mesh=mesh)
        fully_shard(self.inp, mesh=mesh)
        fully_shard(self.head, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.trainer.train_dataloader.sampler.started += 1  # the loader's position, saved in checkpoints

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        if self.automatic_optimization:
            return nn.functional.mse_loss(self(x), y)
        self.manual_step(nn.functional.mse_loss(self(x), y), optimizer="body")
        self.manual_step(nn.functional.mse_loss(self(x), y), optimizer="rest")
        return None

    def on_after_backward(self) -> None:
        """At NAN_STEP: a NaN in one element of rank 1's gradient (under FSDP2: in its shard only).

        Under DDP every rank holds the whole reduced gradient, so the same NaN goes into every rank's copy
        (as a NaN anywhere in the batch would arrive after the all-reduce).
        """
        if self.nan and self.global_step == NAN_STEP:
            grad = self.blocks[0][1].weight.grad
            if isinstance(grad, DTensor):
                if self.global_rank == 1:
                    grad.to_local()[0, 0] = float("nan")
            else:
                grad[-1, 0] = float("nan")


class SkipProbe(Callback):
    """Records, at NAN_STEP, whether the step changed the parameters (each rank its own shards)."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.unchanged: bool | None = None

    def _local(self, module: L.LightningModule) -> list[torch.Tensor]:
        return [(p.to_local() if isinstance(p, DTensor) else p).detach().clone() for p in module.parameters()]

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == NAN_STEP:
            self.before = self._local(module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.before:
            after = self._local(module)
            self.unchanged = all(torch.equal(a, b) for a, b in zip(self.before, after, strict=True))
            self.before = []


class SyncNet(ShardNet):
    """ShardNet whose optimizer steps (backward, the kit callbacks, the update) run under TorchCalls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: dict[int, list[str]] = {}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        step = self.trainer.global_step
        with TorchCalls() as calls:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.calls[step] = calls.names


def strategy(kind: str) -> Any:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp" else "ddp"


def make_trainer(kind: str, out: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy(kind), max_steps=kwargs.pop("max_steps", STEPS),
                     logger=CSVLogger(str(out), name="logs"), log_every_n_steps=kwargs.pop("log_every_n_steps", 4),
                     callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, default_root_dir=str(out), **kwargs)


def full_params(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Every parameter in full (a collective under FSDP2: every rank calls it)."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in module.named_parameters()}


def save(trainer: L.Trainer, module: L.LightningModule, out: Path, callbacks: list[Callback]) -> None:
    params = full_params(module)
    guard = next((cb for cb in callbacks if isinstance(cb, NonFiniteGuard)), None)
    probe = next((cb for cb in callbacks if isinstance(cb, SkipProbe)), None)
    state = {
        "global_step": trainer.global_step,
        "skipped": None if guard is None else {i: float(t.skipped) for i, t in guard._tracks.items()},
        "unchanged_at_nan_step": None if probe is None else probe.unchanged,
        "sharded": any(isinstance(p, DTensor) for p in module.parameters()),
    }
    if isinstance(module, SyncNet):
        state["calls"] = module.calls
    if trainer.global_rank == 0:
        state["params"] = params
    torch.save(state, out / f"rank{trainer.global_rank}.pt")


def run(kind: str, name: str, root: Path) -> None:
    optim, make_callbacks, nan = CONFIGS[name]
    out = root / name
    callbacks = [*make_callbacks(), SkipProbe()]
    trainer = make_trainer(kind, out, callbacks)
    model = ShardNet(optim, kind == "fsdp", nan)
    trainer.fit(model, loader(trainer.global_rank))
    save(trainer, model, out, callbacks)


def run_killed(root: Path) -> None:
    """adamw_norm's fit, SIGKILLed on every rank at KILL_AT (after distributed checkpoints every CKPT_EVERY)."""
    optim, make_callbacks, nan = CONFIGS["adamw_norm"]
    out = root / "resume"
    trainer = make_trainer("fsdp", out, [*make_callbacks(), KillAt(KILL_AT), ModelCheckpoint(
        dirpath=out / "ckpt", filename="{step}", every_n_train_steps=CKPT_EVERY, save_top_k=-1)])
    trainer.fit(ShardNet(optim, True, nan), loader(trainer.global_rank))


def run_resume(root: Path) -> None:
    """The killed fit resumed from its last distributed checkpoint (step 12, mid-epoch), to step 20."""
    optim, make_callbacks, nan = CONFIGS["adamw_norm"]
    out = root / "resume"
    callbacks = [*make_callbacks(), SkipProbe()]
    trainer = make_trainer("fsdp", out, callbacks)
    model = ShardNet(optim, True, nan)
    trainer.fit(model, loader(trainer.global_rank), ckpt_path=str(out / "ckpt" / "step=12.ckpt"))
    save(trainer, model, out, callbacks)


def run_syncs(root: Path) -> None:
    """Clipping, guard and monitor with fused_adamw under FSDP2; logging every 5th batch."""
    out = root / "syncs"
    callbacks = [GradientClipping(max_norm=0.3), NonFiniteGuard(), OptimizerMonitor(every_n_steps=5)]
    trainer = make_trainer("fsdp", out, callbacks, max_steps=10, log_every_n_steps=5)
    model = SyncNet({"optimizer": "fused_adamw", "lr": 1e-2}, True, False)
    trainer.fit(model, loader(trainer.global_rank))
    save(trainer, model, out, callbacks)


if __name__ == "__main__":
    kind, root, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:] or list(CONFIGS)
    for config in names:
        if config == "killed":
            run_killed(root)
        elif config == "resume":
            run_resume(root)
        elif config == "syncs":
            run_syncs(root)
        else:
            run(kind, config, root)
    print(json.dumps({"done": names}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
