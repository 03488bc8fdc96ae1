"""NonFiniteGuard: skip optimizer steps whose gradients are NaN/inf (or spike), without a host sync."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_optkit.callbacks._adaptive import RunningNormStats
from lightning_optkit.callbacks._step_context import (
    LeanCallback,
    active_scaler,
    arm_fused_skip,
    check_sharded_layout,
    disarm_fused_skip,
    ensure_unscaled,
    is_fused_amp_optimizer,
    is_logging_step,
    mark_scaler_skip,
    metric_scope,
    optimizer_index,
    optimizer_labels,
    refuse_sharded_strategy,
    run_after_gradient_readers,
    step_grad_norms,
)
from lightning_optkit.callbacks._step_metrics import BatchSteps, flush_step_metrics, record_step_metrics
from lightning_optkit.errors import SpecError
from lightning_optkit.norms import check_norm_type, combine_norms
from lightning_optkit.optim.modifiers import accepts_step_modifiers
from lightning_optkit.validation import number

__all__ = ["NonFiniteGuard", "TooManySkippedSteps"]


class TooManySkippedSteps(RuntimeError):
    """Raised when ``max_consecutive_skips`` optimizer steps in a row were skipped."""


class _OptimizerTrack:
    """Per-optimizer counters (0-d device tensors) and spike statistics."""

    def __init__(self, spike_alpha: float, spike_warmup: int) -> None:
        self.skipped = torch.zeros((), dtype=torch.float32)
        self.consecutive = torch.zeros((), dtype=torch.float32)
        self.stats = RunningNormStats(alpha=spike_alpha, warmup=spike_warmup)
        self.host_run: int | None = None  # host mirror of `consecutive` on the host-sync path
        self.unchecked = 0  # optimizer steps since `consecutive` was last read on the host

    def to(self, device: torch.device) -> None:
        if self.skipped.device != device:
            self.skipped, self.consecutive = self.skipped.to(device), self.consecutive.to(device)


class NonFiniteGuard(LeanCallback):
    """Skip the optimizer step when any gradient is NaN/inf, or (optionally) when the norm spikes.

    A skipped step leaves parameters, optimizer state and the optimizer's step counters exactly as
    they were; training goes on (LR schedulers still advance). The guard never raises on one bad
    batch (``max_consecutive_skips >= 2``), but raises :class:`TooManySkippedSteps` once
    ``max_consecutive_skips`` steps in a row were skipped, because then the run is broken.

    Args:
        skip_on_spike: If set to ``k``, also skip when the total gradient norm exceeds the running
            mean of past (accepted) norms by ``k`` standard deviations, once ``spike_warmup``
            norms were seen. Statistics: exact mean/variance during warmup, then an EMA with
            decay ``spike_alpha``. Skipped norms do not enter them, so a lasting jump of the norm
            keeps being skipped until ``max_consecutive_skips`` stops the run.
        max_consecutive_skips: Raise after this many consecutive skipped steps (per optimizer), an
            integer >= 2 (see below for when the error comes on the sync-free paths).
        spike_warmup: Norms to observe before spike detection starts.
        spike_alpha: EMA decay of the spike statistics after warmup.
        norm_type: The p of the total gradient norm (non-finite check and spikes).

    How the skip is applied, by optimizer kind:

    * kit optimizers implementing ``AcceptsStepModifiers``: ``defer_skip(flag)``, no host sync;
    * torch optimizers built with ``fused=True``: the device flag is set as the optimizer's
      ``found_inf`` attribute, which torch's fused step reads (it skips the update and undoes the
      step-counter increment), no host sync; the attribute is removed after the batch;
    * under a GradScaler (``16-mixed`` on GPU): the flag is added to the scaler's found-inf record,
      so ``scaler.step`` skips (and backs the scale off once), no extra host sync;
    * any other optimizer: **one bool device-to-host transfer per step**; on a skip all gradients
      of that optimizer are set to None, so torch's step leaves every parameter and its state alone.

    On the sync-free paths the consecutive-skip counter stays on device. It is read on the host
    (one sync) every ``max_consecutive_skips`` optimizer steps of that optimizer, on logging steps,
    and at the end of every training epoch and of training; on all other steps there is no host
    sync. So the error comes at the latest when the run of skips reaches
    ``2 * max_consecutive_skips - 1`` (or at the end of the epoch, if that is sooner), and the
    amortised cost is one host sync per ``max_consecutive_skips`` steps.

    Under DDP the decision is collective without communication: Lightning's DDP has all-reduced
    the gradients before ``on_before_optimizer_step``, so a NaN on one rank reaches every rank's
    gradients and every rank computes the same norm, flag and statistics.

    Logged every logging step to every logger, in one row with GradientClipping's keys, and put in
    ``trainer.callback_metrics`` (``<o>`` is empty with one optimizer and
    ``<label>/`` with several, the optimizer label GradientClipping and OptimizerMonitor use: the kit
    spec's name, else the class name, repeats ``Adam``, ``Adam-1``):

    ===================================  ==========================================================
    Key                                  Value
    ===================================  ==========================================================
    ``guard/<o>skipped_steps``           skipped optimizer steps so far
    ``guard/<o>consecutive_skips``       current run of skipped steps
    ===================================  ==========================================================

    ``last_skip`` holds the latest flag as a 0-d device bool tensor.

    With :class:`GradientClipping` registered too, both use the gradient norms computed once per
    step before either modifies a gradient (whatever the order of the callbacks and clipping's
    ``exclude``), and the skip wins over the clip (a non-finite norm gives a NaN clip coefficient,
    never a finite one).
    """

    def __init__(self, skip_on_spike: float | None = None, max_consecutive_skips: int = 20, *,
                 spike_warmup: int = 25, spike_alpha: float = 0.97, norm_type: float = 2.0) -> None:
        skip_on_spike = number("skip_on_spike", skip_on_spike, positive=True, allow_none=True, strings=False,
                               fix="pass a positive number of standard deviations (e.g. 6.0), or None to skip "
                               "only NaN/inf")
        max_consecutive_skips = number("max_consecutive_skips", max_consecutive_skips, integer=True, at_least=2,
                                       strings=False, fix="pass an integer >= 2 (one bad batch is always skipped, "
                                       "never fatal)")
        spike_warmup = number("spike_warmup", spike_warmup, integer=True, at_least=1, strings=False)
        spike_alpha = number("spike_alpha", spike_alpha, positive=True, below_one=True, strings=False,
                             fix="pass an EMA decay in (0, 1), e.g. 0.97")
        if skip_on_spike is None and (spike_warmup != 25 or spike_alpha != 0.97):
            raise SpecError("skip_on_spike", None, "set skip_on_spike=<k> to use spike_warmup/spike_alpha, "
                            "or drop them", problem="is required when spike_warmup or spike_alpha is set")
        try:
            self.norm_type = check_norm_type(norm_type)
        except (TypeError, ValueError):
            raise SpecError("norm_type", norm_type, "pass a positive p (e.g. 2.0) or float('inf')") from None
        self.skip_on_spike = skip_on_spike
        self.max_consecutive_skips = max_consecutive_skips
        self.spike_warmup = spike_warmup
        self.spike_alpha = spike_alpha
        self.last_skip: torch.Tensor | None = None
        self._tracks: dict[int, _OptimizerTrack] = {}
        self._armed: list[tuple[torch.optim.Optimizer, torch.Tensor]] = []
        self._steps = BatchSteps()  # items: (optimizer, optimizer index)

    @property
    def state_key(self) -> str:
        """Checkpoint key, distinct per configuration so several instances can coexist."""
        key = self.__dict__.get("_state_key")  # Lightning reads it on every hook call: build it once
        if key is None:
            key = self.__dict__["_state_key"] = self._generate_state_key(
                skip_on_spike=self.skip_on_spike, max_consecutive_skips=self.max_consecutive_skips,
                spike_warmup=self.spike_warmup, spike_alpha=self.spike_alpha, norm_type=self.norm_type)
        return key

    @property
    def grad_norm_types(self) -> tuple[float, ...]:
        """Norm types this callback reads, precomputed by whichever callback reads gradients first."""
        return (self.norm_type,)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse sharded strategies (each rank would decide its skip from its own shard's norm) and start
        the counters of a new fit at zero (resuming from a checkpoint restores them after setup)."""
        if stage == "fit":
            refuse_sharded_strategy(trainer, "NonFiniteGuard", "remove NonFiniteGuard, or train with "
                                    "strategy='ddp'")
            self._tracks = {}
            self.last_skip = None
            self._steps.reset()
            # after clipping and monitoring: the plain-torch skip sets the gradients to None, and they
            # must still see (and log) the broken step's gradients
            run_after_gradient_readers(trainer, self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse sharded layouts without exact norms (once ``configure_model`` has sharded the module)."""
        check_sharded_layout(pl_module, "NonFiniteGuard")

    def _track(self, idx: int) -> _OptimizerTrack:
        if idx not in self._tracks:
            self._tracks[idx] = _OptimizerTrack(self.spike_alpha, self.spike_warmup)
        return self._tracks[idx]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Decide the skip flag on device and hand it to the optimizer (see the class docstring)."""
        ensure_unscaled(trainer, optimizer)
        params, norms = step_grad_norms(trainer, optimizer, self.norm_type)
        if not params:
            return
        device = params[0].grad.device
        total = combine_norms(norms, self.norm_type, device)
        idx = optimizer_index(trainer, optimizer)
        track = self._track(idx)
        track.to(device)

        skip = ~torch.isfinite(total)
        if self.skip_on_spike is not None:
            spike = track.stats.ready(device) & (total > track.stats.upper(self.skip_on_spike, device))
            skip = skip | spike
            track.stats.update(total, accept=~skip)
        track.skipped = track.skipped + skip.float()
        track.consecutive = torch.where(skip, track.consecutive + 1.0, torch.zeros_like(track.consecutive))
        self.last_skip = skip

        raw = getattr(optimizer, "optimizer", optimizer)
        scaler = active_scaler(trainer)
        synced = False
        if accepts_step_modifiers(raw):
            raw.defer_skip(skip)
        elif scaler is not None:
            mark_scaler_skip(scaler, raw, skip)
        elif is_fused_amp_optimizer(raw):
            self._armed.append((raw, arm_fused_skip(raw, skip)))  # removed in on_train_batch_end
        else:
            synced = True
            skip_host = bool(skip)  # the one host transfer per step of this path
            if track.host_run is None:
                track.host_run = int(track.consecutive)  # first step or after a checkpoint load
            else:
                track.host_run = track.host_run + 1 if skip_host else 0
            if skip_host:
                for group in raw.param_groups:
                    for p in group["params"]:
                        p.grad = None

        logging = is_logging_step(trainer)
        track.unchecked += 1
        if synced:
            track.unchecked = 0
            self._check_consecutive(trainer, idx, track.host_run)
        elif logging or track.unchecked >= self.max_consecutive_skips:
            track.unchecked = 0
            self._check_consecutive(trainer, idx, int(track.consecutive))  # the amortised host sync
        self._steps.stepped(idx, (optimizer, idx))
        if logging:
            self._record(trainer, optimizer, track)
            self._steps.logged()

    def _record_stepped(self, trainer: pl.Trainer, item: tuple[torch.optim.Optimizer, int], step: int | None) -> None:
        optimizer, idx = item
        self._record(trainer, optimizer, self._tracks[idx], step=step)

    def _record(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, track: _OptimizerTrack,
                step: int | None = None) -> None:
        scope = metric_scope(trainer, optimizer)
        record_step_metrics(trainer, {f"guard/{scope}skipped_steps": track.skipped,
                                      f"guard/{scope}consecutive_skips": track.consecutive}, step=step)

    def _check_consecutive(self, trainer: pl.Trainer, idx: int, run: int) -> None:
        if run >= self.max_consecutive_skips:
            labels = optimizer_labels(trainer)
            name = labels[idx] if idx < len(labels) else str(idx)
            raise TooManySkippedSteps(
                f"NonFiniteGuard skipped {run} consecutive optimizer steps of optimizer {name!r} "
                f"(max_consecutive_skips={self.max_consecutive_skips}): its gradients are non-finite or "
                "spiking on every step, so the run is broken. Fix: check the data and loss for NaN/inf, "
                "lower the learning rate, or use bf16/fp32 instead of fp16."
            )

    def _check_all(self, trainer: pl.Trainer) -> None:
        """Read every optimizer's consecutive-skip counter (one host sync each) and raise if too long."""
        for idx, track in self._tracks.items():
            track.unchecked = 0
            run = track.host_run if track.host_run is not None else int(track.consecutive)
            self._check_consecutive(trainer, idx, run)

    def _disarm(self) -> None:
        for raw, flag in self._armed:
            disarm_fused_skip(raw, flag)
        self._armed.clear()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Remove the ``found_inf`` flags set on fused optimizers during this batch; write logged values."""
        self._disarm()
        self._steps.end_batch(trainer, lambda item, step: self._record_stepped(trainer, item, step))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise if the run of skipped steps reached ``max_consecutive_skips`` (checked once per epoch)."""
        self._check_all(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Clean up flags (if a batch was interrupted), log a stop batch, then check the skip runs a last time.

        Lightning writes its row for the batch it stops at even when the stop came after the step
        (Timer, or a callback's ``on_train_batch_end``), which the step itself could not know.
        """
        self._disarm()
        self._steps.end_training(trainer, lambda item, step: self._record_stepped(trainer, item, step))
        self._check_all(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Write a stop row recorded in ``on_train_end`` (after every callback's, so it is one row)."""
        flush_step_metrics(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Never leave a skip flag on an optimizer after a failed fit."""
        self._disarm()

    def state_dict(self) -> dict[str, Any]:
        """Per-optimizer counters and spike statistics."""
        return {i: {"skipped": t.skipped.detach().cpu(), "consecutive": t.consecutive.detach().cpu(),
                    "stats": t.stats.state_dict()} for i, t in self._tracks.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._tracks = {}
        for i, s in state_dict.items():
            track = self._track(int(i))
            track.skipped = s["skipped"].float().clone()
            track.consecutive = s["consecutive"].float().clone()
            track.stats.load_state_dict(s["stats"])
