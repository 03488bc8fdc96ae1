"""Distributed training: the DDP overlap hook and its strategy.

``RestoreLoaderPosition`` (a data-loader resume callback, not a distributed one) lives in
:mod:`lightning_optkit.callbacks`; it is re-exported here for existing imports.
"""

from lightning_optkit.callbacks.loader_position import RestoreLoaderPosition
from lightning_optkit.distributed.overlap import OverlapDDPStrategy, OverlapState, overlap_hook

__all__ = ["OverlapDDPStrategy", "OverlapState", "RestoreLoaderPosition", "overlap_hook"]
