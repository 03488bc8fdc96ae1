"""SGD with (optionally Nesterov) momentum, written on the kit base: torch.optim.SGD bit for bit."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optkit.errors import SpecError
from lightning_optkit.optim.base import KitOptimizer, non_negative
from lightning_optkit.registry import register_optimizer


@register_optimizer("momentum_sgd")
class MomentumSGD(KitOptimizer):
    """Momentum SGD: ``b <- m*b + g``, ``p <- p - lr*(g + m*b if nesterov else b)``, with ``g += wd*p``.

    Identical in every step to ``torch.optim.SGD(lr, momentum, dampening=0, weight_decay, nesterov)``
    (the buffer starts at zero, so its first value is ``g`` exactly as torch's clone). State per
    parameter: ``momentum_buffer`` (torch's name). ``fused=True`` uses
    ``lightning_optkit.kernels.momentum_sgd_fused_step``, which applies a deferred grad scale and skip
    flag inside its single pass: the fast path for runs with NonFiniteGuard or GradientClipping (the
    foreach path snapshots and selects every parameter and buffer on a guarded step).
    """

    validators = {"lr": non_negative, "momentum": non_negative, "weight_decay": non_negative}
    state_names = ("momentum_buffer",)
    counts_steps = False
    fused_kernel = "momentum_sgd_fused_step"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if nesterov and not momentum:
            raise SpecError("nesterov", nesterov, "set momentum > 0 or nesterov=False",
                            problem="requires a non-zero momentum")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                         foreach=foreach, fused=fused)

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        state: dict[str, list[Tensor]], steps: list[Tensor],
    ) -> None:
        momentum, lr = group["momentum"], group["lr"]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        bufs = state["momentum_buffer"]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1.0)
        direction = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, direction, alpha=-lr)
