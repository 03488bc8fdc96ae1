"""Lean FusedAdamW (int8 and bf16 state) in 1 process, under 2-process DDP and under FSDP2 (gloo, CPU).

Usage: python run_lean.py <single|ddp|fsdp> <out dir> <seed> (init and data). For each state dtype the
script runs three fits of the same model on the same global batches: ``full`` (two epochs), ``first``
(epoch one, then ``trainer.save_checkpoint``: a file, or under FSDP2 Lightning's distributed checkpoint
folder) and ``resumed`` (``first``'s checkpoint resumed to the end of epoch two). Every rank saves its optimizer
state (local tensors and the flat offset of its shard) and rank 0 the full parameters.

The model has a weight of 65 x 64 (4160 elements: lean by its global shape, while each FSDP2 shard of
33 or 32 rows is below the 4096-element threshold), one of 40 x 300 (rows of a full and a short block),
and small layers that keep fp32 state. Lightning launches rank 1 by re-running this command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_optkit import OptimizerMixin
from lightning_optkit.optim.lean_state import flat_offset

STEPS_PER_EPOCH, GLOBAL_BATCH = 4, 8
STATE_DTYPES = ("int8", "bfloat16")


def spec(state_dtype: str) -> dict[str, Any]:
    return {"optimizer": "fused_adamw", "lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": 1.0,
            "state_dtype": state_dtype, "rounding_seed": 5}


def loader(rank: int, world: int, seed: int) -> DataLoader:
    """Global batch ``j`` is samples ``8j .. 8j + 7`` for any process count (rank ``r`` takes its part)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS_PER_EPOCH * GLOBAL_BATCH, 300, generator=g)
    y = torch.randn(STEPS_PER_EPOCH * GLOBAL_BATCH, 1, generator=g)
    per = GLOBAL_BATCH // world
    idx = [j * GLOBAL_BATCH + rank * per + i for j in range(STEPS_PER_EPOCH) for i in range(per)]
    return DataLoader(Subset(TensorDataset(x, y), idx), batch_size=per, shuffle=False)


class LeanNet(OptimizerMixin, L.LightningModule):
    def __init__(self, state_dtype: str, sharded: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.optim_spec = spec(state_dtype)
        self.sharded = sharded
        self.inp = nn.Linear(300, 40, bias=False)  # weight 40 x 300: int8 blocks of 256 and 44
        self.mid = nn.Linear(40, 64)
        self.wide = nn.Linear(64, 65)  # 65 x 64 = 4160 elements
        self.head = nn.Linear(65, 1)

    def configure_model(self) -> None:
        if not self.sharded:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.inp, self.mid, self.wide, self.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        return self.head(torch.tanh(self.wide(h)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


def _local(t: Any) -> Any:
    return t.to_local().clone() if isinstance(t, DTensor) else (t.clone() if isinstance(t, torch.Tensor) else t)


def save(trainer: L.Trainer, model: LeanNet, out: Path) -> None:
    opt = trainer.optimizers[0]
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {"offset": flat_offset(p), **{k: _local(v) for k, v in st.items()}}
             for p, st in opt.state.items()}
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}
    result = {"state": state, "global_step": trainer.global_step}
    if trainer.global_rank == 0:
        result["params"] = full
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


def trainer(kind: str, root: Path, epochs: int) -> L.Trainer:
    strategy: Any = {"single": "auto", "ddp": "ddp",
                     "fsdp": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)}[kind]
    return L.Trainer(accelerator="cpu", devices=1 if kind == "single" else 2, strategy=strategy, max_epochs=epochs,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(root))


def main(kind: str, root: Path, seed: int) -> None:
    world = 1 if kind == "single" else 2
    for state_dtype in STATE_DTYPES:
        base = root / state_dtype
        t = trainer(kind, base, 2)
        model = LeanNet(state_dtype, kind == "fsdp", seed)
        t.fit(model, loader(t.global_rank, world, seed))
        save(t, model, base / "full")
        t = trainer(kind, base, 1)
        model = LeanNet(state_dtype, kind == "fsdp", seed)
        t.fit(model, loader(t.global_rank, world, seed))
        ckpt = base / "epoch1.ckpt"
        t.save_checkpoint(ckpt)
        save(t, model, base / "first")
        t = trainer(kind, base, 2)
        model = LeanNet(state_dtype, kind == "fsdp", seed)
        t.fit(model, loader(t.global_rank, world, seed), ckpt_path=str(ckpt))
        save(t, model, base / "resumed")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps({"done": sys.argv[1]}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
