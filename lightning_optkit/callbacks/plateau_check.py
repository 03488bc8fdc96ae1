"""PlateauMonitorCheck: a plateau schedule whose monitored metric is never logged fails (or warns) at the epoch end."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_optkit.callbacks.base import LeanCallback
from lightning_optkit.schedules.scheduler import KitLRScheduler


class PlateauMonitorCheck(LeanCallback):
    """At the end of each full training epoch after which validation ran, check every kit ``plateau``
    schedule's monitor against ``trainer.callback_metrics``.

    A missing monitor raises SpecError with ``strict=True`` (Lightning raises at the same point for its
    own ReduceLROnPlateau) and warns once with ``strict=False``. Without this check a fit whose last
    epoch ends there would train on without a word: the schedule itself looks at its metric only at
    optimizer steps. An epoch cut short (``max_steps``, a requested stop) is not checked. OptimizerMixin
    adds the callback when its spec has a plateau schedule; register it yourself when calling
    ``build_optimizers`` in your own ``configure_optimizers``.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the monitors still missing after a full epoch and its validation."""
        cut_short = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        every = trainer.check_val_every_n_epoch
        if cut_short or (every is not None and (trainer.current_epoch + 1) % every):
            return
        metrics = trainer.callback_metrics
        for config in trainer.lr_scheduler_configs:
            reader = getattr(config.scheduler, "reader", None) if isinstance(config.scheduler, KitLRScheduler) \
                else None
            if reader is not None and reader.monitor not in metrics:
                reader.report_missing(trainer)
