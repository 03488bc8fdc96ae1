"""Which training batch logs: Lightning's logging step and its ``log_every_n_steps`` rule, in one place."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_optkit.internals import batches_that_stepped


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's logging uses for the current training batch (batches that stepped).

    Lightning's ``self.log`` rows and its LearningRateMonitor both use
    ``fit_loop.epoch_loop._batches_that_stepped``, which counts batches that stepped (once per batch,
    whatever the number of optimizers). There is no public equivalent: ``trainer.global_step`` counts
    every optimizer's steps in manual optimization. This is the callbacks' only read of it.
    """
    stepped = batches_that_stepped(trainer)
    return stepped if stepped is not None else trainer.global_step


def is_logging_step(trainer: pl.Trainer, every_n_steps: int | None = None) -> bool:
    """Whether the current training batch logs, every ``every_n_steps`` batches that stepped.

    ``None`` follows ``Trainer(log_every_n_steps)``. The rule is Lightning's own (its logger
    connector's ``should_update_logs``): ``(logger_step + 1) % every == 0``, or the Trainer was told
    to stop (so the last row before an early stop is written); never when ``every`` is 0. The one
    decision used by GradientClipping, NonFiniteGuard and OptimizerMonitor.
    """
    every = trainer.log_every_n_steps if every_n_steps is None else every_n_steps
    if every < 1:
        return False
    return (logger_step(trainer) + 1) % every == 0 or bool(trainer.should_stop)
