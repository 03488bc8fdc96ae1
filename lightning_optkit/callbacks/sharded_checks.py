"""Refusals at setup and train start for sharded layouts whose whole-tensor norms the callbacks cannot see."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_optkit.errors import SpecError
from lightning_optkit.sharding import check_placements


def refuse_sharded_strategy(trainer: pl.Trainer, callback: str, fix: str) -> None:
    """Raise a SpecError under FSDP1 (``FSDPStrategy``) or DeepSpeed, whose sharding the kit cannot see.

    FSDP1 flattens parameters into per-rank flat buffers and DeepSpeed keeps its own partitions, so
    norms, clip coefficients and skip decisions computed from ``optimizer.param_groups`` would be
    per-shard and could differ between ranks: wrong, silently. FSDP2 under ``ModelParallelStrategy``
    keeps every parameter a DTensor, whose whole-tensor norms the kit reduces across ranks (see
    :mod:`lightning_optkit.sharding`), and DDP gives every rank the reduced gradients: both are fine.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise SpecError("Trainer(strategy)", type(strategy).__name__,
                        "shard with FSDP2 instead: Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, "
                        f"tensor_parallel_size=1)) and fully_shard in configure_model, where {callback} is "
                        f"exact; or {fix}",
                        problem=f"shards the parameters in flat buffers, so {callback} would see each rank's "
                        "shard only")


def check_sharded_layout(pl_module: pl.LightningModule, callback: str) -> None:
    """Refuse (SpecError naming the parameter) a trainable DTensor whose layout has no exact whole-tensor norm.

    Called when training starts, after ``configure_model`` has sharded the module.
    """
    check_placements(((name, p) for name, p in pl_module.named_parameters() if p.requires_grad), callback)
