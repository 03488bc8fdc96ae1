"""GradScaler (``16-mixed``) and the skip flags of fused optimizers, as the callbacks need them.

GradScaler and torch's fused optimizers have no public hook for these; each private attribute used is
named, with why, where it is used.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_optkit.internals import scaler_optimizer_state
from lightning_optkit.unwrap import raw_optimizer


def is_fused_amp_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """A torch optimizer whose fused step reads ``found_inf`` / ``grad_scale`` attributes.

    torch's fused Adam/AdamW/SGD/Adagrad set ``_step_supports_amp_scaling`` (the flag GradScaler
    itself checks) and pass ``getattr(self, "found_inf", None)`` to the kernel, which then leaves
    parameters and state untouched and subtracts ``found_inf`` from the step counters.
    """
    raw = raw_optimizer(optimizer)
    return (
        isinstance(raw, torch.optim.Optimizer)
        and bool(getattr(raw, "_step_supports_amp_scaling", False))
        and all(g.get("fused") for g in raw.param_groups)
    )


def arm_fused_skip(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> torch.Tensor:
    """Make the next fused step of ``optimizer`` a no-op when the 0-d device ``flag`` is true.

    Sets the ``found_inf`` attribute torch's fused step reads (the protocol GradScaler uses; torch has
    no public API for it). Returns the float flag set, for :func:`disarm_fused_skip`.
    """
    raw = raw_optimizer(optimizer)
    found_inf = flag.float().reshape(())
    raw.found_inf = found_inf
    return found_inf


def disarm_fused_skip(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Remove the flag :func:`arm_fused_skip` set, unless something replaced it since."""
    raw = raw_optimizer(optimizer)
    if raw.__dict__.get("found_inf") is found_inf:
        del raw.found_inf


def ensure_unscaled(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Unscale gradients of a fused optimizer under a GradScaler before we read them.

    Lightning's ``16-mixed`` plugin does not unscale optimizers that unscale inside their fused
    step, so in ``on_before_optimizer_step`` their gradients are still scaled. ``scaler.unscale_``
    is public and sync-free; afterwards ``scaler.step`` passes ``grad_scale=None`` and its
    ``found_inf``, so nothing is unscaled twice. The stage check reads GradScaler's private
    per-optimizer state because calling ``unscale_`` twice raises.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    raw = raw_optimizer(optimizer)
    if scaler is None or not scaler.is_enabled() or not getattr(raw, "_step_supports_amp_scaling", False):
        return
    state = scaler_optimizer_state(scaler, raw)
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
    raw = raw_optimizer(optimizer)
    found = scaler_optimizer_state(scaler, raw)["found_inf_per_device"]
    for device, t in found.items():
        torch.maximum(t, flag.to(device, t.dtype), out=t)
