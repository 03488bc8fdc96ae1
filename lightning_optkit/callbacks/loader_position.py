"""RestoreLoaderPosition: make a stateful train loader resume mid-epoch at the batch it had reached.

Lightning 2.6.6 saves the ``state_dict()`` of train loaders that implement ``state_dict`` /
``load_state_dict`` (e.g. torchdata's ``StatefulDataLoader``) and loads it on resume, but only if the
train dataloader is set up *after* the checkpoint is restored. When ``configure_optimizers`` reads
``trainer.estimated_stepping_batches`` (every kit schedule does, to resolve ``"10%"`` or ``"2ep"``; so
does the usual ``OneCycleLR`` recipe) the loader is set up, and its first batch prefetched, before the
restore, and the saved position is silently dropped (Lightning issue #20550): the resumed epoch starts
again from its first batch. This callback loads the saved position when training starts and restarts
the loader's iterator, as the fix proposed upstream (Lightning PR #21765) does inside the fit loop.

A plain ``DataLoader`` has no position to restore: Lightning replays its epoch from the start on a
mid-epoch resume whatever this callback does (resuming at an epoch boundary is exact with any
deterministic sampler, as samplers are re-seeded per epoch through ``set_epoch``).
"""

from typing import Any

import lightning.pytorch as pl

from lightning_optkit.callbacks.base import LeanCallback
from lightning_optkit.internals import load_pending_loader_states

__all__ = ["RestoreLoaderPosition"]


class RestoreLoaderPosition(LeanCallback):
    """Resume stateful train loaders at their saved batch (works around Lightning issue #20550).

    Add it to the Trainer's callbacks when the train loader implements ``state_dict`` /
    ``load_state_dict``; it does nothing on a fresh fit, or when Lightning already restored the loader.
    ``restored`` tells whether the last fit restored a position.
    """

    def __init__(self) -> None:
        self.restored = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load the saved loader position, if Lightning left it pending, before the first batch."""
        self.restored = load_pending_loader_states(trainer.fit_loop)

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save: the loader's position is saved by Lightning itself."""
        return {}
