"""Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optkit.kernels import compiled
from lightning_optkit.optim.base import KitOptimizer, betas, bias_correction, flag, non_negative
from lightning_optkit.optim.blocks import fresh, pick
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
    blocked = True

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

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        state: dict[str, list[Tensor]], steps: list[Tensor],
    ) -> None:
        lr = group["lr"]
        beta1, beta2, beta3 = group["betas"]
        # Per-tensor scalars, once for the bucket (0-d tensors: no host sync).
        stacked = torch.stack(steps)
        not_first = (stacked > 1).to(grads[0].dtype).unbind()
        bc1, bc2 = bias_correction(steps, beta1), bias_correction(steps, beta2)
        root_bc3 = bias_correction(steps, beta3).sqrt_()
        diff_weight = (beta2 * bc1 / bc2).unbind()
        # sqrt(n/bc3) + eps = (sqrt(n) + eps*sqrt(bc3)) / sqrt(bc3), and the step size -lr/bc1 divides it:
        # denom' = (sqrt(n) + eps') * inv_step with eps' = eps*sqrt(bc3), inv_step = -bc1/(lr*sqrt(bc3)).
        scaled_eps = (root_bc3 * group["eps"]).unbind()
        inv_step = (-bc1 / (root_bc3 * lr)).unbind() if lr != 0 else None
        lists = {"param": params, "grad": grads, **state}
        fast, rest = compiled.partition(self, lists)
        if fast:
            rest += self._update_compiled(group, lists, fast, not_first, diff_weight, scaled_eps, inv_step)
            if not rest:
                return
            rest.sort()
            lists = compiled.subset(lists, rest)
            not_first, diff_weight, scaled_eps = ([v[i] for i in rest] for v in (not_first, diff_weight, scaled_eps))
            inv_step = None if inv_step is None else [inv_step[i] for i in rest]
        writes = ("param", "exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")
        for owners, block in self._blocks(lists, writes):
            self._update_block(group, block, pick(not_first, owners), pick(diff_weight, owners),
                               pick(scaled_eps, owners), None if inv_step is None else pick(inv_step, owners))

    def _update_compiled(
        self, group: dict[str, Any], lists: dict[str, list[Tensor]], fast: list[int], not_first: list[Tensor],
        diff_weight: list[Tensor], scaled_eps: list[Tensor], inv_step: list[Tensor] | None,
    ) -> list[int]:
        """The rule on the ``fast`` tensors, one compiled pass each; returns those left to the eager rule."""
        lr, wd, no_prox = group["lr"], group["weight_decay"], group["no_prox"]
        beta1, beta2, beta3 = group["betas"]
        like = lists["param"][fast[0]]
        k = compiled.constants(like, c1=1.0 - beta1, c2=1.0 - beta2, beta2=beta2, beta3=beta3, c3=1.0 - beta3,
                               decay=-lr * wd if no_prox else -lr * wd / (1.0 + lr * wd))
        scale, skip = compiled.modifiers(*self._block_modifiers[:2], like)
        left = []
        names = ("param", "grad", "exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")
        for chunk in compiled.chunks(fast):
            tensors = [[lists[name][i] for i in chunk] for name in names]
            scalars = [[v[i] for i in chunk] for v in (not_first, diff_weight, scaled_eps)]
            if not _ADAN(*tensors, *scalars, None if inv_step is None else [inv_step[i] for i in chunk], k["c1"],
                         k["c2"], k["beta2"], k["beta3"], k["c3"], k["decay"], scale, skip, no_prox=no_prox,
                         decayed=wd != 0):
                left += chunk
        return left

    def _update_block(
        self, group: dict[str, Any], block: dict[str, list[Tensor]], not_first: list[Tensor], diff_weight: list[Tensor],
        scaled_eps: list[Tensor], inv_step: list[Tensor] | None,
    ) -> None:
        """The rule on one cache-sized block: 14 ops, every temporary block-sized."""
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2, beta3 = group["betas"]
        params, grads = block["param"], block["grad"]
        exp_avgs, exp_avg_diffs = block["exp_avg"], block["exp_avg_diff"]
        exp_avg_sqs, prev_grads = block["exp_avg_sq"], block["prev_grad"]

        diff_out, nesterov_out = self._temporaries(block, 2)
        diffs = fresh(diff_out, torch._foreach_sub, torch.sub, grads, prev_grads)
        torch._foreach_mul_(diffs, not_first)
        torch._foreach_copy_(prev_grads, grads)

        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_lerp_(exp_avg_diffs, diffs, 1.0 - beta2)
        nesterov_grads = fresh(nesterov_out, torch._foreach_add, torch.add, grads, diffs, alpha=beta2)
        torch._foreach_mul_(exp_avg_sqs, beta3)
        torch._foreach_addcmul_(exp_avg_sqs, nesterov_grads, nesterov_grads, value=1.0 - beta3)

        # Decay as p - a*p rather than p * (1 - a) or p / (1 + a): in float32 the rounding of
        # (1 - a) would otherwise compound over steps; here it only touches the small term a*p.
        if group["no_prox"] and wd != 0:
            torch._foreach_add_(params, params, alpha=-lr * wd)
        if inv_step is not None:  # lr = 0 moves nothing
            # lr/bc1 * m + lr*b2/bc2 * d over sqrt(n/bc3) + eps, as (m + (b2*bc1/bc2) * d) / denom'
            denom = fresh(diff_out, torch._foreach_sqrt, torch.sqrt, exp_avg_sqs)  # (diffs are done with)
            torch._foreach_add_(denom, scaled_eps)
            torch._foreach_mul_(denom, inv_step)
            numerator = fresh(nesterov_out, torch._foreach_mul, torch.mul, exp_avg_diffs, diff_weight)
            torch._foreach_add_(numerator, exp_avgs)
            torch._foreach_addcdiv_(params, numerator, denom)
        if not group["no_prox"] and wd != 0:
            torch._foreach_add_(params, params, alpha=-lr * wd / (1.0 + lr * wd))


def _adan_rule(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], ds: list[Tensor], ns: list[Tensor], prevs: list[Tensor],
    not_firsts: list[Tensor], diff_weights: list[Tensor], scaled_epss: list[Tensor], inv_steps: list[Tensor] | None,
    c1: Tensor, c2: Tensor, beta2: Tensor, beta3: Tensor, c3: Tensor, decay: Tensor, scale: Tensor | None,
    skip: Tensor, *, no_prox: bool, decayed: bool,
) -> None:
    """:meth:`Adan._update_block`'s ops, fused per tensor (``rounded`` where eager rounds a product)."""
    for j, (p, g, m, d, n, prev) in enumerate(zip(ps, gs, ms, ds, ns, prevs)):
        g = compiled.scaled_grad(g, scale)
        diff = compiled.rounded(skip, (g - prev) * not_firsts[j])
        new_m = torch.lerp(m, g, c1)
        new_d = torch.lerp(d, diff, c2)
        nesterov = g + diff * beta2
        new_n = compiled.rounded(skip, n * beta3) + (c3 * nesterov) * nesterov  # eager addcmul: one FMA
        new_p = p
        if no_prox and decayed:
            new_p = new_p + new_p * decay
        if inv_steps is not None:
            denom = (new_n.sqrt() + scaled_epss[j]) * inv_steps[j]
            new_p = new_p + (compiled.rounded(skip, new_d * diff_weights[j]) + new_m) / denom
        if not no_prox and decayed:
            new_p = new_p + new_p * decay
        for old, new in ((p, new_p), (m, new_m), (d, new_d), (n, new_n), (prev, g)):
            old.copy_(compiled.select(skip, old, new))


#: Contracted, with the products eager rounds kept apart: eager's lerp and add(alpha=) are FMAs.
_ADAN = compiled.CompiledRule(_adan_rule, contract=True)
