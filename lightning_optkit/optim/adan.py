"""Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optkit.optim.base import KitOptimizer, betas, bias_correction, flag, non_negative
from lightning_optkit.registry import register_optimizer


@register_optimizer("adan")
class Adan(KitOptimizer):
    """Adan, following the sail-sg/Adan reference implementation (``adan.py``) step for step.

    Beta convention: the reference CODE's, where each beta weighs the OLD value of its moving average,
    ``m <- b1*m + (1-b1)*g`` with defaults ``betas=(0.98, 0.92, 0.99)``. (The paper writes the same
    rule with beta_paper = 1 - beta_code, i.e. (0.02, 0.08, 0.01).) Per step t, with ``g_prev = g`` at
    t = 1 (so the first difference is 0):

    ``diff = g - g_prev``; ``m <- b1*m + (1-b1)*g``; ``d <- b2*d + (1-b2)*diff``;
    ``n <- b3*n + (1-b3)*(g + b2*diff)^2``; ``denom = sqrt(n/(1-b3^t)) + eps``;
    ``p <- p - lr/(1-b1^t) * m/denom - lr*b2/(1-b2^t) * d/denom``; then ``p <- p / (1 + lr*wd)``
    (proximal decay), or with ``no_prox=True`` ``p <- p * (1 - lr*wd)`` before the update.

    Defaults as the reference: lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0,
    no_prox=False. The reference's ``max_grad_norm`` is left out (it syncs to the host; use the kit's
    clipping callbacks). State: ``exp_avg``, ``exp_avg_diff``, ``exp_avg_sq``, ``prev_grad``, ``step``.
    """

    validators = {
        "lr": non_negative, "betas": betas(3), "eps": non_negative, "weight_decay": non_negative,
        "no_prox": flag,
    }
    state_names = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_prox: bool = False,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                         foreach=foreach)

    def _update(self, group, params, grads, state, steps) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2, beta3 = group["betas"]
        exp_avgs, exp_avg_diffs = state["exp_avg"], state["exp_avg_diff"]
        exp_avg_sqs, prev_grads = state["exp_avg_sq"], state["prev_grad"]

        stacked = torch.stack(steps)
        not_first = (stacked > 1).to(grads[0].dtype).unbind()
        diffs = torch._foreach_sub(grads, prev_grads)
        torch._foreach_mul_(diffs, not_first)

        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_lerp_(exp_avg_diffs, diffs, 1.0 - beta2)
        nesterov_grads = torch._foreach_add(grads, diffs, alpha=beta2)
        torch._foreach_mul_(exp_avg_sqs, beta3)
        torch._foreach_addcmul_(exp_avg_sqs, nesterov_grads, nesterov_grads, value=1.0 - beta3)

        denom = torch._foreach_div(exp_avg_sqs, bias_correction(steps, beta3).unbind())
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        step_size = (lr / bias_correction(steps, beta1)).neg_().unbind()
        step_size_diff = (lr * beta2 / bias_correction(steps, beta2)).neg_().unbind()

        if group["no_prox"] and wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        update = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(update, step_size)
        diff_update = torch._foreach_div(exp_avg_diffs, denom)
        torch._foreach_mul_(diff_update, step_size_diff)
        torch._foreach_add_(params, update)
        torch._foreach_add_(params, diff_update)
        if not group["no_prox"] and wd != 0:
            torch._foreach_div_(params, 1.0 + lr * wd)
        torch._foreach_copy_(prev_grads, grads)
