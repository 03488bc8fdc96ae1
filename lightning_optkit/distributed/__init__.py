"""Distributed training: the DDP overlap hook and its strategy, and exact mid-epoch resume of data loaders."""

from lightning_optkit.distributed.overlap import OverlapDDPStrategy, OverlapState, overlap_hook
from lightning_optkit.distributed.resume import RestoreLoaderPosition

__all__ = ["OverlapDDPStrategy", "OverlapState", "RestoreLoaderPosition", "overlap_hook"]
