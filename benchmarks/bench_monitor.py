"""Cost of OptimizerMonitor: a 2-epoch fit of a small MLP, monitored vs Lightning's own clipping.

Configurations (all with a CSVLogger, timed from ``on_train_start`` to ``on_train_end``):

* ``baseline``: ``Trainer(gradient_clip_val=1.0)`` (torch ``clip_grad_norm_`` through Lightning);
* ``clip``: ``GradientClipping(max_norm=1.0)`` alone;
* ``clip+monitor``: ``GradientClipping(max_norm=1.0)`` + ``OptimizerMonitor(every_n_steps=50)``;
* ``baseline+monitor``: ``Trainer(gradient_clip_val=1.0)`` + ``OptimizerMonitor(every_n_steps=50)``
  (the monitor's own cost);
* ``baseline-again``: the baseline once more, so the table shows the noise floor (its ratio would be
  1.000 on a quiet machine).

Repeats are interleaved: one run of each configuration per round, the order rotated from round to
round so each configuration runs in every position equally often (position alone moves a fit by up
to 1% on a shared machine). Reported per configuration: the median time, its ratio to the baseline's
median, and the median over rounds of the ratio to that round's baseline run (paired, so slow drifts
of the machine cancel). Usage: ``python benchmarks/bench_monitor.py [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.monitor import OptimizerMonitor


class MLP(LightningModule):
    def __init__(self, data: TensorDataset, width: int, batch_size: int) -> None:
        super().__init__()
        self.data, self.batch_size = data, batch_size
        d_in, d_out = data.tensors[0].shape[1], int(data.tensors[1].max()) + 1
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, width), nn.GELU(), nn.Linear(width, d_out))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)


class LoopTimer(Callback):
    """Times the training loop; Python's garbage collector is paused meanwhile, as ``timeit`` does."""

    def on_train_start(self, trainer, pl_module):
        gc.collect()
        gc.disable()
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start
        gc.enable()


def run(config: str, data: TensorDataset, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = MLP(data, args.width, args.batch_size)
    timer = LoopTimer()
    callbacks: list[Callback] = [timer]
    clip_val = None
    if config.startswith("baseline"):
        clip_val = 1.0
    else:
        callbacks.append(GradientClipping(max_norm=1.0))
    if config.endswith("+monitor"):
        callbacks.append(OptimizerMonitor(every_n_steps=args.every))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(accelerator="cpu", devices=1, max_epochs=2, gradient_clip_val=clip_val,
                          logger=CSVLogger(tmp), callbacks=callbacks, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp)
        trainer.fit(model)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="rounds (a multiple of 5 rotates evenly)")
    parser.add_argument("--every", type=int, default=50, help="OptimizerMonitor(every_n_steps=...); the target "
                        "is stated for 50")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=12_800)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: less noise on a "
                        "shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(args.samples, 64, generator=g), torch.randint(0, 10, (args.samples,), generator=g))
    configs = ["baseline", "clip", "clip+monitor", "baseline+monitor", "baseline-again"]
    steps = 2 * (args.samples // args.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP width {args.width}, "
          f"{steps} optimizer steps (2 epochs), monitor every {args.every} steps, {args.repeats} interleaved repeats")
    run("baseline", data, args)  # warm-up (imports, allocator)
    times: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for config in configs[r % len(configs):] + configs[:r % len(configs)]:
            times[config].append(run(config, data, args))
    base = statistics.median(times["baseline"])
    print(f"{'config':<18}{'median s':>10}{'ms/step':>9}{'ratio':>8}{'paired ratio':>14}{'IQR of paired':>16}")
    for config in configs:
        med = statistics.median(times[config])
        paired = [t / b for t, b in zip(times[config], times["baseline"], strict=True)]
        q1, _, q3 = statistics.quantiles(paired, n=4)
        print(f"{config:<18}{med:>10.3f}{1e3 * med / steps:>9.3f}{med / base:>8.3f}"
              f"{statistics.median(paired):>14.3f}{f'{q1:.3f}-{q3:.3f}':>16}")


if __name__ == "__main__":
    main()
