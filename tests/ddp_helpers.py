"""Shared model, data and run configuration for the DDP and resume tests (used in-process and by scripts).

Every run sees the same global batches whatever the number of processes: rank ``r`` of ``w`` takes
positions ``r, r + w, ...`` of the epoch's permutation, so global batch ``j`` is the same set of
samples for 1 process (batch ``w * b``) and for ``w`` processes (batch ``b`` each).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_optkit import OptimizerMixin
from lightning_optkit.callbacks import RestoreLoaderPosition
from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard
from lightning_optkit.callbacks.monitor import OptimizerMonitor

SAMPLES = 64
GLOBAL_BATCH = 8
MAX_STEPS = 14  # 8 batches per epoch: the run ends 6 steps into epoch 1
NAN_STEP = 5  # global step whose batch gets a NaN sample ...
NAN_POSITION = 1  # ... at this position of the global batch: rank 1's first sample with 2 processes
CKPT_EVERY = 4  # checkpoints at steps 4 (mid-epoch 0), 8 (end of epoch 0) and 12 (mid-epoch 1)
KILL_AT = 13  # the killed run dies here, after the step-12 checkpoint

SPEC = {"optimizer": "fused_adamw", "lr": 2e-2, "weight_decay": 0.05, "schedule": {"name": "cosine", "warmup": "25%"}}


def dataset() -> TensorDataset:
    """Fixed random regression data (same in every process)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return TensorDataset(x, y)


class ResumableSampler(Sampler[int]):
    """DistributedSampler's split (shuffled by seed + epoch, rank-strided) that resumes mid-epoch exactly.

    Lightning 2.6.6 restarts a plain DataLoader from the epoch's first batch when it resumes mid-epoch
    (it only shortens the epoch); a loader that implements ``state_dict``/``load_state_dict`` is
    restored instead. :class:`ResumableLoader` saves this sampler's epoch and the number of batches
    training started in it (counted in :meth:`TinyNet.on_train_batch_start`, since the loader's own
    iterator runs one prefetched batch ahead), and the next iteration skips them.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int = 0) -> None:
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed
        self.epoch = 0
        self.started = 0  # batches started in this epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.started = epoch, 0

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[self.rank :: self.world].tolist()
        return iter(mine[self.started * self.batch_size :])

    def __len__(self) -> int:
        return self.size // self.world


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in (and restored from) Lightning checkpoints."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "started": self.sampler.started}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.epoch, self.sampler.started = state["epoch"], state["started"]


def loader(rank: int, world: int, *, resumable: bool = True) -> DataLoader:
    """The loader of ``rank`` among ``world`` processes (global batch GLOBAL_BATCH)."""
    batch = GLOBAL_BATCH // world
    sampler = ResumableSampler(SAMPLES, batch, rank, world)
    cls = ResumableLoader if resumable else DataLoader
    return cls(dataset(), batch_size=batch, sampler=sampler, drop_last=True)


class TinyNet(OptimizerMixin, L.LightningModule):
    """An MLP regressor with the kit optimizer spec; injects one NaN sample at ``nan_step``."""

    def __init__(self, optim: dict[str, Any] | None = None, nan_step: int | None = None, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)  # the same initial weights in every run and process
        self.body = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, 1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            sampler.started += 1

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.hparams.nan_step is not None and self.global_step == self.hparams.nan_step:
            world = self.trainer.world_size
            if self.trainer.global_rank == NAN_POSITION % world:
                x = x.clone()
                x[NAN_POSITION // world] = math.nan
        return nn.functional.mse_loss(self.head(self.body(x)), y)


class NormRecorder(Callback):
    """Records, per optimizer step, the clip callback's total norm and the guard's skip flag (test only)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, bool]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        clip = next(cb for cb in trainer.callbacks if isinstance(cb, GradientClipping))
        guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))
        self.rows.append((trainer.global_step, clip.last_total_norm.item(), bool(guard.last_skip)))


class KillAt(Callback):
    """SIGKILLs this process when training reaches ``step`` (a checkpoint from earlier steps is on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class RecordingCheckpointIO(TorchCheckpointIO):
    """Torch checkpoint IO that remembers the files this process wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[str] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.saved.append(Path(path).name)
        super().save_checkpoint(checkpoint, path, storage_options)


def kit_callbacks() -> list[Callback]:
    """Clipping with checkpointed state (zscore), the guard, the monitor, and the norm recorder."""
    return [GradientClipping(max_norm=1.0, algorithm="zscore", warmup_steps=3, z_thresh=2.0),
            NonFiniteGuard(max_consecutive_skips=3), OptimizerMonitor(every_n_steps=1, momentum=False),
            NormRecorder()]


def trainer(out: Path, world: int, *, strategy: Any = None, callbacks: list[Callback] | None = None,
            checkpoints: bool = True, **kwargs: Any) -> L.Trainer:
    """A CPU Trainer for ``world`` processes writing logs and checkpoints under ``out``."""
    cbs = [*(callbacks or []), RestoreLoaderPosition()]
    if checkpoints:
        cbs.append(ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", every_n_train_steps=CKPT_EVERY,
                                   save_top_k=-1))
    return L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy or ("ddp" if world > 1 else "auto"),
        max_steps=kwargs.pop("max_steps", MAX_STEPS), logger=CSVLogger(str(out), name="logs"),
        log_every_n_steps=1, callbacks=cbs, enable_checkpointing=checkpoints, plugins=[RecordingCheckpointIO()],
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        default_root_dir=str(out), **kwargs,
    )


def final_state(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """Everything that must match between runs: parameters, optimizer, schedule and callback states."""
    state: dict[str, Any] = {
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "global_step": trainer.global_step,
        "saved_checkpoints": trainer.strategy.checkpoint_io.saved,
    }
    for cb in trainer.callbacks:
        if isinstance(cb, (GradientClipping, NonFiniteGuard)):
            state[type(cb).__name__] = cb.state_dict()
        if isinstance(cb, NormRecorder):
            state["norms"] = cb.rows
    return state


def same_on_every_rank(state: dict[str, Any]) -> dict[str, Any]:
    """The state without what legitimately differs per rank (which checkpoint files it wrote)."""
    return {k: v for k, v in state.items() if k != "saved_checkpoints"}


def assert_identical(a: Any, b: Any, path: str = "state") -> None:
    """Exact (bitwise for tensors) equality of nested states, naming the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), \
            f"{path} differs: max abs diff {(a - b).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """Parameters equal to ``atol`` (for runs whose gradients are summed in a different order)."""
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------- launching
SCRIPT = Path(__file__).parent / "ddp_scripts" / "run_fit.py"
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK")


def launch(configs: list[dict[str, Any]], *, expect_kill: bool = False, timeout: float = 300) -> None:
    """Run ``configs`` with ddp_scripts/run_fit.py in a fresh process (which launches its DDP ranks)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, str(SCRIPT), json.dumps(configs)], env=env, capture_output=True,
                            text=True, timeout=timeout, cwd=Path(__file__).parents[1])
    if expect_kill:
        assert result.returncode != 0, "the run was expected to be killed"
    else:
        assert result.returncode == 0, result.stderr[-6000:]


def load_ranks(out: Path, world: int = 2) -> list[dict[str, Any]]:
    """The final states saved by each rank of a run."""
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


OVERLAP_RUN = {"world": 2, "accumulate": 2, "bucket_cap_mb": 0.001, "max_steps": 6, "width": 32}
_SHARED: dict[str, Path] = {}


def shared_runs(tmp_path_factory: Any) -> Path:
    """The uninterrupted 2-process runs used by several test files, launched once per session.

    ``kit``: the kit callbacks, a NaN batch, checkpoints; ``overlap`` / ``plain``: the same model trained
    with and without the overlap hook (gradient accumulation 2, tiny buckets, checkpoints).
    """
    if "root" not in _SHARED:
        root = tmp_path_factory.mktemp("ddp_runs")
        launch([
            {"out": str(root / "kit"), "world": 2, "mode": "kit"},
            {"out": str(root / "overlap"), "mode": "overlap", **OVERLAP_RUN},
            {"out": str(root / "plain"), "mode": "plain", **OVERLAP_RUN},
        ])
        _SHARED["root"] = root
    return _SHARED["root"]
