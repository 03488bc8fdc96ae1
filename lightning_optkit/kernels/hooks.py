"""Adapters from KitOptimizer's fused path to the functional steps.

A KitOptimizer with ``fused=True`` calls its class's ``fused_step(group, params, grads, state_lists, scale,
skip)``, a direct reference to one of these: MomentumSGD holds ``momentum_sgd_fused_step``, Lion
``lion_fused_step``. The backend is ``"auto"`` (``LIGHTNING_OPTKIT_BACKEND`` overrides it).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_optkit.kernels.functional import lion_step, sgd_momentum_step


def momentum_sgd_fused_step(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor], state_lists: dict[str, list[Tensor]],
    scale: Tensor | None, skip: Tensor | None,
) -> None:
    """MomentumSGD's fused step: :func:`sgd_momentum_step` on ``state_lists["momentum_buffer"]``."""
    sgd_momentum_step(
        params, grads, state_lists["momentum_buffer"], lr=group["lr"], momentum=group["momentum"],
        weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group.get("maximize", False),
        grad_scale=scale, skip=skip,
    )


def lion_fused_step(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor], state_lists: dict[str, list[Tensor]],
    scale: Tensor | None, skip: Tensor | None,
) -> None:
    """Lion's fused step: :func:`lion_step` on ``state_lists["exp_avg"]``."""
    beta1, beta2 = group["betas"]
    lion_step(
        params, grads, state_lists["exp_avg"], lr=group["lr"], beta1=beta1, beta2=beta2,
        weight_decay=group["weight_decay"], maximize=group.get("maximize", False), grad_scale=scale, skip=skip,
    )
