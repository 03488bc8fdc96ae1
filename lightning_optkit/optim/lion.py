"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optkit.kernels import compiled
from lightning_optkit.kernels.hooks import lion_fused_step
from lightning_optkit.kernels.torch_fused import lion_lists
from lightning_optkit.optim.base import KitOptimizer, betas, non_negative
from lightning_optkit.registry import register_optimizer


@register_optimizer("lion")
class Lion(KitOptimizer):
    """Lion, following the google/automl reference (``lion_pytorch.py``) step for step.

    Per step: ``p <- p * (1 - lr*wd)``; ``c = b1*m + (1-b1)*g``; ``p <- p - lr*sign(c)``;
    ``m <- b2*m + (1-b2)*g`` (see :func:`lightning_optkit.kernels.torch_fused.lion_lists`: the same
    foreach operations on both paths, so ``fused=True`` on the torch backend, the one on CPU, agrees
    with the foreach path bit for bit; the Triton kernel on CUDA rounds in its own order). Defaults as
    the reference: lr=1e-4, betas=(0.9, 0.99), wd=0 (the paper suggests a 3-10x smaller lr and 3-10x
    larger wd than AdamW). State: ``exp_avg``.
    ``fused=True`` uses :func:`~lightning_optkit.kernels.hooks.lion_fused_step`, which applies a deferred grad
    scale and skip flag inside the update: the fast path for runs with NonFiniteGuard or
    GradientClipping (the foreach path snapshots and selects every parameter and moment on a guarded
    step). On CPU it runs foreach ops with the scale and skip folded in (0.6x the guarded foreach step's
    time, see benchmarks/bench_foreach.py).
    """

    validators = {"lr": non_negative, "betas": betas(2), "weight_decay": non_negative}
    state_names = ("exp_avg",)
    counts_steps = False
    blocked = True
    fused_step = staticmethod(lion_fused_step)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach,
                         fused=fused)

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        state: dict[str, list[Tensor]], steps: list[Tensor],
    ) -> None:
        beta1, beta2 = group["betas"]
        lists = {"param": params, "grad": grads, "exp_avg": state["exp_avg"]}
        fast, rest = compiled.partition(self, lists)
        if fast:
            lr, wd = group["lr"], group["weight_decay"]
            k = compiled.constants(params[fast[0]], rate=lr * wd, neg_lr=-lr, c1=1.0 - beta1, c2=1.0 - beta2)
            scale, skip = compiled.modifiers(*self._block_modifiers[:2], params[fast[0]])
            for chunk in compiled.chunks(fast):
                if not _LION([params[i] for i in chunk], [grads[i] for i in chunk],
                             [state["exp_avg"][i] for i in chunk], k["rate"], k["neg_lr"], k["c1"], k["c2"], scale,
                             skip, decayed=wd != 0):
                    rest += chunk
            if not rest:
                return
            lists = compiled.subset(lists, sorted(rest))
        for _, block in self._blocks(lists, ("param", "exp_avg")):
            # The same foreach operations as fused=True on the torch backend, so both paths agree bit for bit.
            lion_lists(block["param"], block["grad"], block["exp_avg"], lr=group["lr"], beta1=beta1, beta2=beta2,
                       weight_decay=group["weight_decay"])


def _lion_rule(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], rate: Tensor, neg_lr: Tensor, c1: Tensor,
               c2: Tensor, scale: Tensor | None, skip: Tensor, *, decayed: bool) -> None:
    """Lion's foreach rule (:func:`~lightning_optkit.kernels.torch_fused.lion_lists`), fused per tensor."""
    for p, g, m in zip(ps, gs, ms):
        g = compiled.scaled_grad(g, scale)
        new_p = p - compiled.rounded(skip, p * rate) if decayed else p
        new_p = new_p + torch.lerp(m, g, c1).sign() * neg_lr
        p.copy_(compiled.select(skip, p, new_p))
        m.copy_(compiled.select(skip, m, torch.lerp(m, g, c2)))


#: Contracted: eager torch's lerp is an FMA, so the compiled lerp must be one to give its bits.
_LION = compiled.CompiledRule(_lion_rule, contract=True)
