"""One logged row per logging step for the kit's callbacks, joined to Lightning's own row for that step.

Private to :mod:`lightning_optkit.callbacks`. GradientClipping and NonFiniteGuard record 0-d device
tensors here during ``on_before_optimizer_step`` (a later value of a key replaces the earlier one, so
with several steps in a batch the last step wins, as with ``self.log``); OptimizerMonitor records its
norms at the end of the batch as tensors with a function that turns their host values into its keys
(:func:`record_step_tensors`: totals and per-layer norms are combined on the host). On recording, the
clipping and guard tensors are also put in ``trainer.callback_metrics`` (so EarlyStopping,
ModelCheckpoint, plateau schedules and later callbacks can read them) and ``trainer.logged_metrics``.
At ``on_train_batch_end`` the row is sealed: all its tensors, every callback's, go to the host in one
``tolist()`` (the one device-to-host transfer of a logging step; none on the other steps) and it gets
the ``epoch``, as Lightning's rows do.

One row per step: Lightning writes its own row for the step (``self.log`` values, ``epoch``) right
after every ``on_train_batch_end``, calling each logger's ``log_metrics``. Loggers append a row per call
(CSVLogger a CSV line, WandbLogger a history row), and Lightning has no public way to add values to
its row, so during a fit each logger's ``log_metrics`` is wrapped on the instance (:func:`join_rows`;
removed at teardown): a call for the pending row's step gets the row's values added, a call for a
later step writes the pending row first. A row Lightning does not join (no ``self.log`` at that step)
is written when the next row is recorded, or at teardown: still one row, with the epoch.

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

from lightning_optkit.callbacks.cadence import is_logging_step, logger_step

__all__ = ["BatchSteps", "flush_step_metrics", "join_rows", "publish_step_metrics", "record_host_metrics",
           "record_step_metrics", "record_step_tensors", "seal_step_metrics", "stop_joining_rows"]

#: Turns the host values of recorded tensors into row values, and values for single loggers (logger -> values).
Resolve = Callable[[list[float]], tuple[dict[str, Any], dict[Any, dict[str, Any]]]]


@dataclass
class _Row:
    step: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # device tensors, not moved yet
    floats: dict[str, Any] = field(default_factory=dict)  # host values (moved, or recorded as such)
    only_for: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(logger) -> values for it alone
    written: set[int] = field(default_factory=set)  # id(logger) of the loggers that have the row
    resolves: list[tuple[list[torch.Tensor], Resolve]] = field(default_factory=list)  # record_step_tensors

    def to_host(self) -> None:
        """Move every recorded tensor to the host, one transfer, and resolve the deferred values."""
        if not self.values and not self.resolves:
            return
        tensors = [*self.values.values(), *(t for ts, _ in self.resolves for t in ts)]
        floats: list[float] = []
        if tensors:
            device = tensors[0].device
            parts = [t if t.device == device and t.dtype == torch.float32 and t.ndim == 0
                     else t.to(device, torch.float32).reshape(()) for t in tensors]
            floats = torch.stack(parts).tolist()  # the single device-to-host transfer
        count = len(self.values)
        self.floats.update(zip(self.values, floats[:count], strict=True))
        for ts, resolve in self.resolves:
            values, extra = resolve(floats[count:count + len(ts)])
            count += len(ts)
            self.floats.update(values)
            for logger, more in extra.items():
                self.only_for.setdefault(id(logger), {}).update(more)
        self.values = {}
        self.resolves = []

    def for_logger(self, logger: Any) -> dict[str, Any]:
        extra = self.only_for.get(id(logger))
        return {**self.floats, **extra} if extra else dict(self.floats)


# trainer -> the row of its current (or last unwritten) logging step
_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _row(trainer: pl.Trainer, step: int | None) -> _Row:
    step = logger_step(trainer) if step is None else step
    row = _ROWS.get(trainer)
    if row is not None and row.step != step:  # an earlier step's row: its step is over, write it
        flush_step_metrics(trainer)
        row = None
    if row is None:
        row = _ROWS[trainer] = _Row(step)
    return row


def record_step_metrics(trainer: pl.Trainer, values: dict[str, torch.Tensor], step: int | None = None) -> None:
    """Queue 0-d tensors for the current batch's row and put them in ``trainer.callback_metrics`` and
    ``trainer.logged_metrics`` (no host sync; copies, so later in-place edits don't leak). ``step``
    defaults to the current batch's logging step."""
    row = _row(trainer, step)
    copies = {key: value.detach().reshape(()).clone() for key, value in values.items()}
    row.values.update(copies)
    # visible at once, as self.log's values are, to callbacks that run later in this batch
    trainer.callback_metrics.update(copies)
    trainer.logged_metrics.update(copies)


def publish_step_metrics(trainer: pl.Trainer, values: dict[str, torch.Tensor]) -> None:
    """Put 0-d tensors in ``trainer.callback_metrics`` only (copies; not logged: another callback logs them)."""
    trainer.callback_metrics.update({key: value.detach().reshape(()).clone() for key, value in values.items()})


def record_step_tensors(trainer: pl.Trainer, tensors: list[torch.Tensor], resolve: Resolve,
                        step: int | None = None) -> None:
    """Queue 0-d device tensors for the row of ``step`` (default: the current batch's); at the row's one
    transfer ``resolve`` gets their host values, in order, and returns the row's values from them and values
    for single loggers (e.g. a ``wandb.Histogram``). Not put in ``trainer.callback_metrics``."""
    _row(trainer, step).resolves.append((list(tensors), resolve))


def record_host_metrics(trainer: pl.Trainer, values: dict[str, float], step: int | None = None,
                        only_for: dict[Any, dict[str, Any]] | None = None) -> None:
    """Add host values to the row of ``step`` (default: the current batch's); ``only_for`` maps a logger
    to values only it gets (e.g. a ``wandb.Histogram``)."""
    row = _row(trainer, step)
    row.floats.update(values)
    for logger, extra in (only_for or {}).items():
        row.only_for.setdefault(id(logger), {}).update(extra)


def seal_step_metrics(trainer: pl.Trainer) -> None:
    """At the end of a logging batch: move the row's tensors to the host and give it the epoch.

    Lightning's row for the step comes next and is joined (see :func:`join_rows`); no host work is
    left for the steps that follow.
    """
    if not _ROWS:  # the common case, every step that does not log: nothing to do
        return
    row = _ROWS.get(trainer)
    if row is None:
        return
    row.to_host()
    row.floats.setdefault("epoch", trainer.current_epoch)


def flush_step_metrics(trainer: pl.Trainer) -> None:
    """Write the queued row, if any, to every logger that does not have it yet."""
    if not _ROWS:
        return
    row = _ROWS.pop(trainer, None)
    if row is None:
        return
    row.to_host()
    if not row.floats:
        return
    row.floats.setdefault("epoch", trainer.current_epoch)
    for logger in trainer.loggers:
        if id(logger) not in row.written:
            row.written.add(id(logger))
            _original(logger)(row.for_logger(logger), step=row.step)


class _JoinRows:
    """Stands in for one logger's ``log_metrics`` during a fit and joins the kit's row to the call for its step."""

    def __init__(self, logger: Any, trainer: pl.Trainer) -> None:
        self.original = logger.log_metrics
        self.logger = weakref.ref(logger)
        self.trainer = weakref.ref(trainer)

    def __call__(self, metrics: dict[str, Any], step: int | None = None) -> Any:
        trainer, logger = self.trainer(), self.logger()
        row = _ROWS.get(trainer) if trainer is not None else None
        if row is not None and logger is not None and id(logger) not in row.written and step is not None:
            if step == row.step:
                row.to_host()
                row.floats.setdefault("epoch", trainer.current_epoch)
                row.written.add(id(logger))
                metrics = {**row.for_logger(logger), **metrics}
                if all(id(lg) in row.written for lg in trainer.loggers):
                    _ROWS.pop(trainer, None)
            elif step > row.step:  # Lightning moved on without joining it: the older row goes first
                flush_step_metrics(trainer)
        return self.original(metrics, step=step)


def _original(logger: Any) -> Callable[..., Any]:
    joined = logger.__dict__.get("log_metrics")
    return joined.original if isinstance(joined, _JoinRows) else logger.log_metrics


def join_rows(trainer: pl.Trainer) -> None:
    """Wrap every logger's ``log_metrics`` for this fit (idempotent; each kit callback calls it at setup)."""
    for logger in trainer.loggers:
        joined = logger.__dict__.get("log_metrics")
        if isinstance(joined, _JoinRows):
            joined.trainer = weakref.ref(trainer)
        else:
            logger.log_metrics = _JoinRows(logger, trainer)


def stop_joining_rows(trainer: pl.Trainer) -> None:
    """Write the pending row and give every logger its own ``log_metrics`` back (at teardown)."""
    flush_step_metrics(trainer)
    for logger in trainer.loggers:
        if isinstance(logger.__dict__.get("log_metrics"), _JoinRows):
            del logger.log_metrics


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

        The row is sealed (moved to the host, given the epoch) and written with Lightning's own row for
        the step, which comes next; values other kit callbacks add in their batch-end hooks join it.
        """
        late = trainer.should_stop and bool(self._batch) and not self._recorded and is_logging_step(trainer)
        if late:
            for item in self._batch.values():
                record(item, None)
        self._unlogged = {} if (self._recorded or late) else self._batch
        self._batch = {}
        self._recorded = False
        seal_step_metrics(trainer)

    def end_training(self, trainer: pl.Trainer, record: Callable[[Any, int | None], None]) -> None:
        """At ``on_train_end``: record the last batch if the Trainer was told to stop after its step.

        Written at teardown, after every callback's ``on_train_end``, so it is one row.
        """
        if trainer.should_stop and self._unlogged:
            step = logger_step(trainer) - 1  # the stop batch's, counted as stepped since
            for item in self._unlogged.values():
                record(item, step)
        self._unlogged = {}
