"""Shared plumbing for callbacks acting in ``on_before_optimizer_step``.

Private to :mod:`lightning_optkit.callbacks`: which step logs, which optimizer this is, the
gradients it will use, their norms (computed once per step and shared between callbacks), and
GradScaler unscaling for fused optimizers. The few uses of Lightning/torch internals live here.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lightning_optkit.norms import tensor_norms

__all__ = [
    "active_scaler",
    "ensure_unscaled",
    "mark_scaler_skip",
    "grad_params",
    "is_logging_step",
    "is_fused_amp_optimizer",
    "optimizer_index",
    "step_tensor_norms",
]


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether the current training batch writes logs (``Trainer(log_every_n_steps=...)``).

    Lightning has no public API for this; its own LearningRateMonitor and DeviceStatsMonitor read
    ``trainer._logger_connector.should_update_logs``, so we do the same, with a public fallback.
    """
    connector = getattr(trainer, "_logger_connector", None)
    flag = getattr(connector, "should_update_logs", None)
    if isinstance(flag, bool):
        return flag
    every = trainer.log_every_n_steps
    return every > 0 and (trainer.global_step + 1) % every == 0


def optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    """Position of ``optimizer`` (raw or LightningOptimizer-wrapped) in ``trainer.optimizers``."""
    raw = getattr(optimizer, "optimizer", optimizer)
    for i, opt in enumerate(trainer.optimizers):
        if opt is raw or opt is optimizer:
            return i
    return 0


def grad_params(optimizer: torch.optim.Optimizer, skip_ids: frozenset[int] = frozenset()
                ) -> list[torch.nn.Parameter]:
    """Parameters of ``optimizer`` that hold a gradient, in param-group order, minus ``skip_ids``."""
    seen: set[int] = set()
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None or id(p) in seen or id(p) in skip_ids:
                continue
            seen.add(id(p))
            out.append(p)
    return out


# optimizer -> (key, norms). One entry per optimizer: the norms of its gradients at this step, so
# GradientClipping and NonFiniteGuard on the same step pay for one foreach_norm pass, whichever runs
# first. The key names the step and the exact gradient tensors, so a stale entry is never reused.
_NORM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_tensor_norms(trainer: pl.Trainer, optimizer: torch.optim.Optimizer,
                      params: Sequence[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """Per-parameter gradient norms for this optimizer step, shared between callbacks.

    Call before modifying gradients in place: the cache holds the pre-modification norms.
    """
    key = (trainer.global_step, float(norm_type), tuple(id(p) for p in params),
           tuple(id(p.grad) for p in params))
    raw = getattr(optimizer, "optimizer", optimizer)
    hit = _NORM_CACHE.get(raw)
    if hit is not None and hit[0] == key:
        return hit[1]
    norms = tensor_norms([p.grad for p in params], norm_type)
    _NORM_CACHE[raw] = (key, norms)
    return norms


def is_fused_amp_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """A torch optimizer whose fused step reads ``found_inf`` / ``grad_scale`` attributes.

    torch's fused Adam/AdamW/SGD/Adagrad set ``_step_supports_amp_scaling`` (the flag GradScaler
    itself checks) and pass ``getattr(self, "found_inf", None)`` to the kernel, which then leaves
    parameters and state untouched and subtracts ``found_inf`` from the step counters.
    """
    raw = getattr(optimizer, "optimizer", optimizer)
    return (
        isinstance(raw, torch.optim.Optimizer)
        and bool(getattr(raw, "_step_supports_amp_scaling", False))
        and all(g.get("fused") for g in raw.param_groups)
    )


def ensure_unscaled(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Unscale gradients of a fused optimizer under a GradScaler before we read them.

    Lightning's ``16-mixed`` plugin does not unscale optimizers that unscale inside their fused
    step, so in ``on_before_optimizer_step`` their gradients are still scaled. ``scaler.unscale_``
    is public and sync-free; afterwards ``scaler.step`` passes ``grad_scale=None`` and its
    ``found_inf``, so nothing is unscaled twice. The stage check reads GradScaler's private
    per-optimizer state because calling ``unscale_`` twice raises.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    raw = getattr(optimizer, "optimizer", optimizer)
    if scaler is None or not scaler.is_enabled() or not getattr(raw, "_step_supports_amp_scaling", False):
        return
    state = scaler._per_optimizer_states[id(raw)]
    if state["stage"].name == "READY":
        scaler.unscale_(raw)


def active_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The precision plugin's enabled GradScaler (``16-mixed`` on GPU), else None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def mark_scaler_skip(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                     flag: torch.Tensor) -> None:
    """Make ``scaler.step`` skip this optimizer's step when the 0-d device ``flag`` is true.

    After ``unscale_`` the scaler decides from its recorded per-device ``found_inf`` tensors, so we
    add the flag to them (on device, no sync). GradScaler exposes no public hook for this, hence the
    private ``_per_optimizer_states``. As for any inf step, the scale is then backed off once.
    """
    raw = getattr(optimizer, "optimizer", optimizer)
    found = scaler._per_optimizer_states[id(raw)]["found_inf_per_device"]
    for device, t in found.items():
        torch.maximum(t, flag.to(device, t.dtype), out=t)
