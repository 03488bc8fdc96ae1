"""SGD with (optionally Nesterov) momentum, written on the kit base: torch.optim.SGD bit for bit."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optkit.errors import SpecError
from lightning_optkit.kernels.hooks import momentum_sgd_fused_step
from lightning_optkit.optim.base import KitOptimizer, non_negative, scalar_dtype
from lightning_optkit.registry import register_optimizer


@register_optimizer("momentum_sgd")
class MomentumSGD(KitOptimizer):
    """Momentum SGD: ``b <- m*b + (1-d)*g`` (``b <- g`` on a parameter's first step),
    ``p <- p - lr*(g + m*b if nesterov else b)``, with ``g += wd*p``.

    Identical in every step to ``torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov)``
    (dampening d as torch's: the first step copies the gradient into the buffer undamped; nesterov
    needs d = 0, as in torch). State per parameter: ``momentum_buffer`` (torch's name); with a nonzero
    dampening also a ``step`` counter (to find a parameter's first step on the device: the buffer
    starts at zero, which for d = 0 gives torch's first value ``g`` exactly without one). ``fused=True``
    uses :func:`~lightning_optkit.kernels.hooks.momentum_sgd_fused_step`, which applies a deferred grad scale and
    skip flag inside its single pass: the fast path for runs with NonFiniteGuard or GradientClipping
    (the foreach path snapshots and selects every parameter and buffer on a guarded step). The fused
    kernels have no first-step rule, so ``fused=True`` takes ``dampening=0`` only.
    """

    validators = {"lr": non_negative, "momentum": non_negative, "weight_decay": non_negative,
                  "dampening": non_negative}
    state_names = ("momentum_buffer",)
    counts_steps = False
    fused_step = staticmethod(momentum_sgd_fused_step)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, foreach=foreach, fused=fused)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if group["nesterov"] and (not group["momentum"] or group["dampening"] != 0):
            raise SpecError("nesterov", group["nesterov"], "set momentum > 0 and dampening=0, or nesterov=False",
                            problem="requires a non-zero momentum and zero dampening")
        if group["dampening"] != 0:
            if group["fused"]:
                raise SpecError("dampening", group["dampening"], "use dampening=0 with fused=True, or "
                                "fused=None (the foreach path) for a damped momentum",
                                problem="is not supported by the fused kernels")
            self._count_steps()

    def _count_steps(self) -> None:
        """Keep a step counter from now on (a damped group exists); parameters that already have a
        buffer are past their first step."""
        if self.counts_steps:
            return
        self.counts_steps = True  # instance attribute: only this optimizer counts
        for p, state in self.state.items():
            if state and "step" not in state:
                state["step"] = torch.ones((), dtype=scalar_dtype(p), device=p.device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's format (an SGD checkpoint loads too); a buffer without a counter is past its first step."""
        super().load_state_dict(state_dict)
        if self.counts_steps:
            for p, state in self.state.items():
                if state and "step" not in state:
                    state["step"] = torch.ones((), dtype=scalar_dtype(p), device=p.device)

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        state: dict[str, list[Tensor]], steps: list[Tensor],
    ) -> None:
        momentum, lr, dampening = group["momentum"], group["lr"], group["dampening"]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        bufs = state["momentum_buffer"]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1.0 - dampening)
        if dampening != 0:
            # torch's first step copies the gradient (undamped) into the new buffer.
            for buf, grad, step in zip(bufs, grads, steps):
                torch.where(step == 1, grad, buf, out=buf)
        direction = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, direction, alpha=-lr)
