"""Sharded strategies and layouts the kit cannot make exact are refused before training, with the fix.

FSDP1 and DeepSpeed need a GPU in Lightning, so a real CPU Trainer gets the strategy swapped in (an
uninitialised instance: only its type is read). Layouts FSDP2 can produce but the kit does not reduce
(2-D meshes, Partial placements, agc on a weight split along its rows' dimension) are built as DTensors
on a one-process gloo mesh. The real 2-process FSDP2 runs are in test_fsdp2.py.
"""

from __future__ import annotations

import lightning.pytorch as pl
import lightning.pytorch.strategies as strategies
import pytest
import torch
import torch.distributed as dist
from test_clipping import Regressor
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

from lightning_optkit import OptimizerSpec, build_optimizers
from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard
from lightning_optkit.callbacks.monitor import OptimizerMonitor
from lightning_optkit.errors import SpecError
from lightning_optkit.norms import tensor_norms
from lightning_optkit.sharding import check_placements

FLAT_SHARDED = ["FSDPStrategy", "DeepSpeedStrategy"]


def trainer_with(strategy: str, monkeypatch) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    cls = getattr(strategies, strategy)
    monkeypatch.setattr(trainer._accelerator_connector, "strategy", cls.__new__(cls))  # no GPU here
    return trainer


@pytest.mark.parametrize("strategy", FLAT_SHARDED)
@pytest.mark.parametrize("callback", [GradientClipping(max_norm=1.0), NonFiniteGuard(), OptimizerMonitor()],
                         ids=lambda c: type(c).__name__)
def test_norm_reading_callbacks_are_refused_under_flat_sharding(callback, strategy, monkeypatch):
    trainer = trainer_with(strategy, monkeypatch)
    with pytest.raises(SpecError, match=rf"Trainer\(strategy\)={strategy!r}.*shards the parameters in flat buffers"
                                        r".*Fix: shard with FSDP2 instead.*ModelParallelStrategy"):
        callback.setup(trainer, Regressor(), "fit")


@pytest.mark.parametrize("strategy", FLAT_SHARDED)
@pytest.mark.parametrize("optimizer", ["fused_adamw", "lamb"])
def test_optimizers_with_cross_tensor_norms_are_refused_under_flat_sharding(optimizer, strategy, monkeypatch):
    trainer = trainer_with(strategy, monkeypatch)
    with pytest.raises(SpecError, match=rf"optimizer=.*computes norms across whole tensors.*{strategy}.*"
                                        r"Fix: shard with FSDP2 instead"):
        build_optimizers(Regressor(), OptimizerSpec(optimizer=optimizer, lr=1e-3), trainer=trainer)


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "adan", "momentum_sgd"])
def test_element_wise_optimizers_build_under_a_sharded_strategy(optimizer, monkeypatch):
    trainer = trainer_with("FSDPStrategy", monkeypatch)
    opt = build_optimizers(Regressor(), OptimizerSpec(optimizer=optimizer, lr=1e-3), trainer=trainer)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == 1e-3


def test_ddp_keeps_everything(monkeypatch):
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False, enable_progress_bar=False)
    for callback in (GradientClipping(max_norm=1.0), NonFiniteGuard()):
        callback.setup(trainer, Regressor(), "fit")
    build_optimizers(Regressor(), OptimizerSpec(optimizer="fused_adamw", lr=1e-3), trainer=trainer)


# ---------------------------------------------------------------------------------- DTensor layouts
@pytest.fixture(scope="module")
def mesh():
    """A one-process gloo process group and 1-D mesh (destroyed after the module's tests)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


class Sharded(pl.LightningModule):
    """A Linear whose weight and bias are DTensors with the given placements."""

    def __init__(self, mesh, weight_placement, mesh2d=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.Linear(4, 3)
        where = mesh2d if mesh2d is not None else mesh
        placements = [weight_placement] * where.ndim
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), where, placements))
        layer.bias = nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Shard(0)]))
        self.layer = layer


def test_sharded_norms_equal_the_whole_tensors_norms(mesh):
    torch.manual_seed(1)
    plain = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2) * 1e3]
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in plain]
    sharded[1] = distribute_tensor(plain[1], mesh, [Replicate()])
    sharded[1][3] = float("nan")  # the inf-norm must carry a NaN through its max-reduce
    plain[1][3] = float("nan")
    for p in (2.0, 1.0, 3.0, float("inf")):
        got, want = tensor_norms(sharded, p), tensor_norms(plain, p)
        for g, w in zip(got, want, strict=True):
            assert not isinstance(g, type(sharded[0]))  # plain tensors, the same on every rank
            torch.testing.assert_close(g, w, rtol=1e-6, atol=0, equal_nan=True)


def test_partial_placement_is_refused_naming_the_parameter(mesh):
    module = Sharded(mesh, Partial())
    with pytest.raises(SpecError, match=r"parameter 'layer.weight'.*Partial.*would compute per-shard values"):
        check_placements(module.named_parameters(), "GradientClipping")
    for callback in (GradientClipping(max_norm=1.0), NonFiniteGuard(), OptimizerMonitor()):
        with pytest.raises(SpecError, match=r"parameter 'layer.weight'"):
            callback.on_train_start(None, module)


def test_two_dimensional_mesh_is_refused(mesh):
    mesh2d = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    module = Sharded(mesh, Shard(0), mesh2d=mesh2d)
    with pytest.raises(SpecError, match=r"parameter 'layer.weight'.*2-D device mesh.*tensor_parallel_size=1"):
        GradientClipping(max_norm=1.0).on_train_start(None, module)
    with pytest.raises(SpecError, match=r"parameter 'layer.weight'.*2-D device mesh"):
        build_optimizers(module, OptimizerSpec(optimizer="fused_adamw", lr=1e-3))


def test_agc_refuses_a_weight_split_across_its_rows(mesh):
    GradientClipping(algorithm="agc").on_train_start(None, Sharded(mesh, Shard(0)))  # rows whole: fine
    GradientClipping(max_norm=1.0).on_train_start(None, Sharded(mesh, Shard(1)))  # whole-tensor norms: fine
    with pytest.raises(SpecError, match=r"parameter 'layer.weight'.*split along dim \(1,\).*unit-wise norms"):
        GradientClipping(algorithm="agc").on_train_start(None, Sharded(mesh, Shard(1)))


def test_muon_is_refused_on_sharded_parameters(mesh):
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    with pytest.raises(SpecError, match=r"optimizer='Muon'.*orthogonalises each gradient as a whole matrix.*"
                                        r"Fix: give the 2-D hidden weights to adamw"):
        build_optimizers(Sharded(mesh, Shard(0)), OptimizerSpec(optimizer="muon", lr=1e-3))
