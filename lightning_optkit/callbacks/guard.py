"""NonFiniteGuard: skip optimizer steps whose gradients are NaN/inf (or spike), without a host sync."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

from lightning_optkit.callbacks._adaptive import RunningNormStats
from lightning_optkit.callbacks._step_metrics import BatchSteps, join_rows, record_step_metrics, stop_joining_rows
from lightning_optkit.callbacks.amp import (
    active_scaler,
    arm_fused_skip,
    disarm_fused_skip,
    ensure_unscaled,
    is_fused_amp_optimizer,
    mark_scaler_skip,
)
from lightning_optkit.callbacks.base import LeanCallback
from lightning_optkit.callbacks.naming import group_labels, optimizer_labels
from lightning_optkit.callbacks.sharded_checks import check_sharded_layout, refuse_sharded_strategy
from lightning_optkit.callbacks.stages import GradientRole, order_gradient_stages
from lightning_optkit.callbacks.step_norms import step_view
from lightning_optkit.errors import SpecError
from lightning_optkit.norms import check_norm_type, combine_norms
from lightning_optkit.param_names import named_parameters
from lightning_optkit.validation import number

__all__ = ["NonFiniteGuard", "TooManySkippedSteps"]

log = logging.getLogger(__name__)


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
        self.seen = 0  # skipped steps known on the host (as of the last read)
        self.reported = 0  # skipped steps a console line has reported
        self.read_step = 0  # trainer.global_step at the last read

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

    Skips are told on the console (the ``lightning_optkit.callbacks.guard`` logger, WARNING, rank 0): one
    line when the guard first learns of a skip (at once on the host-sync path; at its next host read on
    the sync-free ones), then at most one line per :attr:`WARN_EVERY_S` seconds, each with the step
    and the count; on a logging step that skipped, the line names the tensors whose gradients were
    non-finite (one extra transfer, on that step only). Skips no line reported are summed up in one
    line at the end of training.

    With :class:`GradientClipping` registered too, both use the gradient norms computed once per
    step before either modifies a gradient (whatever the order of the callbacks and clipping's
    ``exclude``), and the skip wins over the clip (a non-finite norm gives a NaN clip coefficient,
    never a finite one).
    """

    #: at most one console line about skipped steps per this many seconds (plus a summary at the end)
    WARN_EVERY_S = 60.0

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
        self._steps = BatchSteps()  # items: (metric scope, optimizer index)
        self._last_warning: float | None = None  # time.monotonic() of the last console line
        self._names: dict[int, str] | None = None  # id(param) -> name, built for the first named line

    #: Decides whether the step runs: after every stage that observes or modifies the gradients.
    gradient_role: ClassVar[GradientRole] = "decide"

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
            self._last_warning = None
            self._names = None
            join_rows(trainer)  # one row per step with Lightning's own
            # after clipping and monitoring: the plain-torch skip sets the gradients to None, and they
            # must still see (and log) the broken step's gradients
            order_gradient_stages(trainer)

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
        view = step_view(trainer, optimizer)
        params, norms = view.pre_norms(self.norm_type)
        if not params:
            return
        device = params[0].grad.device
        total = combine_norms(norms, self.norm_type, device)
        idx = view.index
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

        view.decided_skip(skip)
        raw = view.raw
        scaler = active_scaler(trainer)
        synced = False
        if view.accepts_modifiers:
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
            track.seen += int(skip_host)
            if skip_host:
                for group in raw.param_groups:
                    for p in group["params"]:
                        p.grad = None

        logging = view.logging
        track.unchecked += 1
        if synced:
            track.unchecked = 0
            self._check_consecutive(view.label, track.host_run)
            self._tell(trainer, pl_module, idx, track, current=skip_host, logging=logging, params=params, norms=norms)
        elif logging or track.unchecked >= self.max_consecutive_skips:
            track.unchecked = 0
            run, seen = torch.stack([track.consecutive, track.skipped]).tolist()  # the amortised host sync
            self._check_consecutive(view.label, int(run))
            track.seen = int(seen)
            self._tell(trainer, pl_module, idx, track, current=run > 0, logging=logging, params=params, norms=norms)
        self._steps.stepped(idx, (view.scope, idx))
        if logging:
            self._record(trainer, view.scope, track)
            self._steps.logged()

    def _record_stepped(self, trainer: pl.Trainer, item: tuple[str, int], step: int | None) -> None:
        scope, idx = item
        self._record(trainer, scope, self._tracks[idx], step=step)

    def _record(self, trainer: pl.Trainer, scope: str, track: _OptimizerTrack, step: int | None = None) -> None:
        record_step_metrics(trainer, {f"guard/{scope}skipped_steps": track.skipped,
                                      f"guard/{scope}consecutive_skips": track.consecutive}, step=step)

    def _check_consecutive(self, name: str, run: int) -> None:
        """Raise TooManySkippedSteps when optimizer ``name``'s run of skipped steps is too long."""
        if run >= self.max_consecutive_skips:
            raise TooManySkippedSteps(
                f"NonFiniteGuard skipped {run} consecutive optimizer steps of optimizer {name!r} "
                f"(max_consecutive_skips={self.max_consecutive_skips}): its gradients are non-finite or "
                "spiking on every step, so the run is broken. Fix: check the data and loss for NaN/inf, "
                "lower the learning rate, or use bf16/fp32 instead of fp16."
            )

    def _check_all(self, trainer: pl.Trainer) -> None:
        """Read every optimizer's consecutive-skip counter (one host sync each) and raise if too long."""
        labels = optimizer_labels(trainer)
        for idx, track in self._tracks.items():
            track.unchecked = 0
            if track.host_run is not None:
                run = track.host_run
            else:
                run, seen = (int(v) for v in torch.stack([track.consecutive, track.skipped]).tolist())
                track.seen = seen
            self._check_consecutive(labels[idx] if idx < len(labels) else str(idx), run)
            self._tell(trainer, None, idx, track, current=False, logging=False)

    # ------------------------------------------------------------------ console lines
    def _tell(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None, idx: int, track: _OptimizerTrack,
              *, current: bool, logging: bool, params: list | None = None, norms: list | None = None,
              final: bool = False) -> None:
        """One WARNING line about skips not told yet, at most one per WARN_EVERY_S seconds (``final``: always)."""
        new, step = track.seen - track.reported, trainer.global_step
        since, track.read_step = track.read_step, step
        if new <= 0 or trainer.global_rank != 0:
            return
        now = time.monotonic()
        if not final and self._last_warning is not None and now - self._last_warning < self.WARN_EVERY_S:
            return
        labels = optimizer_labels(trainer)
        of = f" of optimizer {labels[idx]!r}" if len(labels) > 1 and idx < len(labels) else ""
        optimizer = trainer.optimizers[idx] if idx < len(trainer.optimizers) else None
        total = f"{track.seen} in this fit"
        if final:
            text = (f"NonFiniteGuard: {track.seen} optimizer steps{of} skipped in this fit, {new} of them since "
                    "the last message")
        elif current and new == 1:
            why = self._why(pl_module, params, norms, logging, optimizer)
            text = f"NonFiniteGuard: skipped optimizer step {step}{of} ({why}; {total})"
        else:
            latest = f"the latest at step {step}" if current else f"between steps {since} and {step}"
            text = (f"NonFiniteGuard: skipped {new} optimizer steps{of}, {latest} "
                    f"({self._why(pl_module, params, norms, logging and current, optimizer)}; {total})")
        if not final:
            text += f"; at most one such line per {self.WARN_EVERY_S:g} s"
        log.warning(text)
        track.reported = track.seen
        self._last_warning = now

    def _why(self, pl_module: pl.LightningModule | None, params: list | None, norms: list | None,
             named: bool, optimizer: torch.optim.Optimizer | None = None) -> str:
        """Which gradients were non-finite (one transfer; only for a skipped logging step), else the rule.

        With several param groups each tensor also names its group, by the monitor's label (``<member>/<group>``
        in a chain)."""
        if not named or pl_module is None or not params:
            return "non-finite or spiking gradients; logging steps name the tensors"
        finite = torch.stack([n.reshape(()).float() for n in norms]).isfinite().tolist()
        if self._names is None:
            self._names = {id(p): name for name, p in named_parameters(pl_module)}  # _orig_mod. stripped
        group_of = {}
        if optimizer is not None and len(optimizer.param_groups) > 1:
            group_of = {id(p): label for label, g in zip(group_labels(optimizer), optimizer.param_groups, strict=True)
                        for p in g["params"]}
        bad = [self._names.get(id(p), "?") + (f" (group {group_of[id(p)]})" if id(p) in group_of else "")
               for p, ok in zip(params, finite) if not ok]
        if not bad:
            return "the gradient norm spiked (skip_on_spike)"
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return f"non-finite gradients in {shown}"

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
        for idx, track in self._tracks.items():  # what the rate limit held back, in one line
            self._tell(trainer, None, idx, track, current=False, logging=False, final=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Write a stop row recorded in ``on_train_end`` (after every callback's, so it is one row) and give the
        loggers back their own ``log_metrics``."""
        stop_joining_rows(trainer)

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
            track.seen = track.reported = int(track.skipped)  # told in the run that saved them
            track.stats.load_state_dict(s["stats"])
