"""Host-side helpers shared by the Triton launchers: device scalars and launch settings."""

from __future__ import annotations

import torch

NUM_WARPS = 8


def device_scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-d float32 tensor on ``device`` (no host sync for tensors already there)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=device)


def optional_scalar(value: torch.Tensor | None, device: torch.device, placeholder: torch.Tensor
                    ) -> tuple[torch.Tensor, bool]:
    """``(tensor, present)``: the device scalar, or ``placeholder`` when ``value`` is None."""
    if value is None:
        return placeholder, False
    return device_scalar(value, device), True
