"""FSDP2 on CPU (two processes, gloo): clipping, the NaN guard and the monitor, exact on sharded gradients.

By hand: under FSDP2 every gradient is a DTensor holding one rank's rows. ``clip_grad_norm_`` returns
a norm that is per-rank unless read with ``full_tensor()``; Lightning's own norm clipping under
``ModelParallelStrategy`` is not correct (its test is skipped), and a NaN check on the local shard
makes the ranks disagree on whether to skip, so their shards drift apart silently.

With the kit: ``fully_shard`` each layer in ``configure_model`` and train under
``ModelParallelStrategy``; ``GradientClipping``, ``NonFiniteGuard`` and ``OptimizerMonitor`` take
whole-tensor norms from the shards with one all-reduce per step (no host sync), so every rank clips by
the same coefficient and skips the same steps. The script puts a NaN into one element of rank 1's
shard at step 5: both ranks skip that step. At the end it gathers the full parameters and checks them
against the same fit under plain DDP, run by this script first.

Lightning launches the second rank by re-running this script, so everything runs under
``if __name__ == "__main__":``.

Run: ``python examples/11_fsdp2.py`` (CPU, two processes, ~20 seconds).
"""

from __future__ import annotations

import os
import tempfile

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_optkit import OptimizerMixin, OptimizerSpec
from lightning_optkit.callbacks import GradientClipping, NonFiniteGuard, OptimizerMonitor
from lightning_optkit.demo import spirals

NAN_STEP = 5


class SpiralNet(OptimizerMixin, L.LightningModule):
    def __init__(self, sharded: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sharded = sharded
        self.optim_spec = OptimizerSpec("adamw", lr=1e-2, weight_decay=0.01, schedule={"name": "cosine",
                                                                                     "warmup": "10%"})
        self.layers = nn.ModuleList([nn.Linear(2, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 3)])

    def configure_model(self) -> None:
        """Shard every layer over the data-parallel mesh (FSDP2), then the root."""
        if self.sharded:
            mesh = self.device_mesh["data_parallel"]
            for layer in self.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, norm, hidden, out = self.layers
        return out(nn.functional.gelu(hidden(norm(nn.functional.gelu(inp(x))))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_after_backward(self) -> None:
        if self.global_step == NAN_STEP:  # a NaN in one element of one rank's gradient
            grad = self.layers[2].weight.grad
            if isinstance(grad, DTensor):
                if self.global_rank == 1:
                    grad.to_local()[0, 0] = float("nan")  # rank 1's shard only
            else:
                grad[0, 0] = float("nan")  # DDP: every rank holds the reduced gradient


# CSV logs go to $OPTKIT_EXAMPLES_OUT or a temporary folder, never into the working directory.
LOG_DIR = os.environ.get("OPTKIT_EXAMPLES_OUT") or os.path.join(tempfile.gettempdir(), "optkit-example-11")


def fit(sharded: bool) -> tuple[L.Trainer, SpiralNet]:
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=3, log_every_n_steps=5,
                        callbacks=[GradientClipping(max_norm=0.5), NonFiniteGuard(), OptimizerMonitor()],
                        logger=L.pytorch.loggers.CSVLogger(LOG_DIR, name="fsdp2" if sharded else "ddp"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = SpiralNet(sharded)
    trainer.fit(model, DataLoader(spirals(n_per_class=100), batch_size=25, shuffle=False))
    return trainer, model


def full_parameters(model: SpiralNet) -> list[torch.Tensor]:
    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach() for p in model.parameters()]


def main() -> None:
    _, ddp_model = fit(sharded=False)
    trainer, model = fit(sharded=True)
    sharded, reference = full_parameters(model), full_parameters(ddp_model)
    if trainer.is_global_zero:
        first = next(model.parameters())
        print(f"{trainer.world_size} ranks, FSDP2: parameters are {type(first).__name__} {tuple(first.placements)}, "
              f"{trainer.global_step} steps")
        metrics = trainer.callback_metrics
        print(f"steps skipped by NonFiniteGuard (NaN in rank 1's shard at step {NAN_STEP}): "
              f"{int(metrics['guard/skipped_steps'])}")
        print(f"last logged grad_clip/total_norm={float(metrics['grad_clip/total_norm']):.6f}, "
              f"grad_clip/clip_coef={float(metrics['grad_clip/clip_coef']):.4f}")
        diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(sharded, reference, strict=True))
        print(f"max relative difference from the same fit under DDP: {diff:.2e}")
    if torch.distributed.is_initialized():  # Lightning leaves the group alive; end it before exit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
