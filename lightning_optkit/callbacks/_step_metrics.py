"""One logged row per logging batch for the callbacks' 0-d device tensors, moved to the host in one transfer.

Private to :mod:`lightning_optkit.callbacks`. GradientClipping and NonFiniteGuard record their values
here during ``on_before_optimizer_step`` (a later value of a key replaces the earlier one, so with
several steps in a batch the last step wins, as with ``self.log``) and flush them in
``on_train_batch_end`` with one ``tolist()`` to every logger's ``log_metrics``, at the step Lightning's
own rows use. On recording they are also put in ``trainer.callback_metrics`` (so EarlyStopping,
ModelCheckpoint, plateau schedules and later callbacks can read them) and ``trainer.logged_metrics``.

Why not ``pl_module.log``: on this kind of loop it costs about 0.7-1 ms per call on a CPU (Lightning
moves the stored result's whole state to the value's device on every call) and keeps every logged key
in the per-batch result processing for the rest of the epoch; for two keys every 50 steps that was
1.2% of a 2.4 ms step. Lightning's own LearningRateMonitor writes to the loggers directly too.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_optkit.callbacks._step_context import is_logging_step, logger_step

__all__ = ["BatchSteps", "flush_step_metrics", "record_step_metrics"]


@dataclass
class _Row:
    step: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)


# trainer -> the row being collected for its current logging batch
_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_step_metrics(trainer: pl.Trainer, values: dict[str, torch.Tensor], step: int | None = None) -> None:
    """Queue 0-d tensors for the current batch's row and put them in ``trainer.callback_metrics`` and
    ``trainer.logged_metrics`` (no host sync; copies, so later in-place edits don't leak). ``step``
    defaults to the current batch's logging step."""
    step = logger_step(trainer) if step is None else step
    row = _ROWS.get(trainer)
    if row is not None and row.step != step:  # left over from a batch that did not reach its end
        flush_step_metrics(trainer)
        row = None
    if row is None:
        row = _ROWS[trainer] = _Row(step)
    copies = {key: value.detach().reshape(()).clone() for key, value in values.items()}
    row.values.update(copies)
    # visible at once, as self.log's values are, to callbacks that run later in this batch
    trainer.callback_metrics.update(copies)
    trainer.logged_metrics.update(copies)


def flush_step_metrics(trainer: pl.Trainer) -> None:
    """Write the queued row, if any, to every logger with one host transfer."""
    if not _ROWS:  # the common case, every step that does not log: nothing to do
        return
    row = _ROWS.pop(trainer, None)
    if row is None or not row.values or not trainer.loggers:
        return
    device = next(iter(row.values.values())).device
    tensors = [v if v.device == device else v.to(device) for v in row.values.values()]
    floats = torch.stack([t.float() for t in tensors]).tolist()  # the single device-to-host transfer
    metrics = dict(zip(row.values, floats, strict=True))
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=row.step)


class BatchSteps:
    """What one callback saw at each optimizer's step of the current batch, so a stop row can be logged.

    The callback notes each step (:meth:`stepped`) and, on a logging step, records its values at once
    (:meth:`logged`). A stop decided after the optimizer step makes the batch a logging one only later,
    as for Lightning's own rows: decided by a callback that ran earlier, it is seen in
    :meth:`end_batch`; by one that runs later, in :meth:`end_training`. Then the noted items are
    recorded with ``record(item, step)`` (``step=None``: the current batch's). Items are references
    only: no device work on the steps that do not log.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new fit)."""
        self._batch: dict[int, Any] = {}  # optimizer index -> item, this batch
        self._recorded = False  # this batch's values were recorded at its step
        self._unlogged: dict[int, Any] = {}  # the last batch's items when it did not log

    def stepped(self, index: int, item: Any) -> None:
        """Note optimizer ``index``'s latest step in this batch."""
        self._batch[index] = item

    def logged(self) -> None:
        """This batch's values were recorded at the step."""
        self._recorded = True

    def end_batch(self, trainer: pl.Trainer, record: Callable[[Any, int | None], None]) -> None:
        """At ``on_train_batch_end``: record a stop decided since the step, and write the batch's row.

        A row recorded here is written at the next flush (the next logging step, or teardown), so the
        other kit callbacks' values join it.
        """
        late = trainer.should_stop and bool(self._batch) and not self._recorded and is_logging_step(trainer)
        if late:
            for item in self._batch.values():
                record(item, None)
        self._unlogged = {} if (self._recorded or late) else self._batch
        self._batch = {}
        self._recorded = False
        if not late:
            flush_step_metrics(trainer)

    def end_training(self, trainer: pl.Trainer, record: Callable[[Any, int | None], None]) -> None:
        """At ``on_train_end``: record the last batch if the Trainer was told to stop after its step.

        Written at teardown, after every callback's ``on_train_end``, so it is one row.
        """
        if trainer.should_stop and self._unlogged:
            step = logger_step(trainer) - 1  # the stop batch's, counted as stepped since
            for item in self._unlogged.values():
                record(item, step)
        self._unlogged = {}
