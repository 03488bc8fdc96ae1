"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optkit import validation
from lightning_optkit.kernels import compiled
from lightning_optkit.optim.base import KitOptimizer, bias_correction, non_negative, scalar_dtype
from lightning_optkit.optim.blocks import fresh, pick
from lightning_optkit.registry import register_optimizer


def _schedule_free_betas(name: str, value: Any) -> None:
    # beta1 = 0 would make the averaged point x unrecoverable from y and z.
    validation.numbers(name, value, 2, non_negative=True, below_one=True, strings=False)
    validation.number(f"{name}[0]", value[0], positive=True, below_one=True, strings=False,
                      fix="pass (beta1, beta2) with 0 < beta1 < 1 and 0 <= beta2 < 1, e.g. (0.9, 0.999)")


def _non_negative_int(name: str, value: Any) -> None:
    validation.number(name, value, integer=True, non_negative=True, strings=False)


@register_optimizer("schedulefree_adamw")
class ScheduleFreeAdamW(KitOptimizer):
    """Schedule-Free AdamW, following facebookresearch/schedule_free ``AdamWScheduleFree`` step for step.

    The parameters hold ``y = (1-b1)*z + b1*x`` in train mode and the average ``x`` in eval mode;
    call :meth:`train` before training steps and :meth:`eval` before validation, inference and saving
    checkpoints (the :class:`~lightning_optkit.callbacks.ScheduleFreeMode` callback does it for you).
    The optimizer starts in train mode (before the first step x = y = z). Per step t (counted per
    parameter): ``lr_t = lr * min(1, t/warmup_steps)``; ``lr_max = max(lr_max, lr_t)``;
    ``w = t^r * lr_max^weight_lr_power``; ``c = w / sum(w)``; ``v <- b2*v + (1-b2)*g^2``;
    ``u = g / (sqrt(v/(1-b2^t)) + eps) + wd*y``; ``y <- (1-c)*y + c*z + lr_t*(b1*(1-c) - 1)*u``;
    ``z <- z - lr_t*u``. Defaults as the reference: lr=0.0025, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0, warmup_steps=0, r=0, weight_lr_power=2. No LR scheduler is needed (use
    warmup_steps). State: ``z``, ``exp_avg_sq``, ``step``, and the 0-d ``weight_sum``, ``lr_max``
    (per parameter here, so a skipped step can leave them untouched without a host sync).
    """

    validators = {
        "lr": non_negative, "betas": _schedule_free_betas, "eps": non_negative, "weight_decay": non_negative,
        "warmup_steps": _non_negative_int, "r": non_negative, "weight_lr_power": non_negative,
    }
    state_names = ("z", "exp_avg_sq")
    scalar_state_names = ("weight_sum", "lr_max")
    blocked = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, foreach=foreach)
        for group in self.param_groups:
            group.setdefault("train_mode", True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it joins in the optimizer's current train/eval mode."""
        modes = {g.get("train_mode", True) for g in self.param_groups}
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("train_mode", modes.pop() if len(modes) == 1 else True)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        return {
            "z": p.detach().clone(memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            "weight_sum": torch.zeros((), dtype=scalar_dtype(p), device=p.device),
            "lr_max": torch.full((), -1.0, dtype=scalar_dtype(p), device=p.device),
        }

    @property
    def train_mode(self) -> bool:
        """True when the parameters hold y (training point), False when they hold x (eval point)."""
        return all(group["train_mode"] for group in self.param_groups)

    @torch.no_grad()
    def eval(self) -> None:
        """Switch the parameters to the averaged point x (for validation, inference, checkpoints)."""
        for group in self.param_groups:
            if group["train_mode"]:
                beta1 = group["betas"][0]
                for p in group["params"]:
                    z = self.state[p].get("z")
                    if z is not None:
                        p.lerp_(z.to(p.device), 1.0 - 1.0 / beta1)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Switch the parameters to the training point y (required before ``step``)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                beta1 = group["betas"][0]
                for p in group["params"]:
                    z = self.state[p].get("z")
                    if z is not None:
                        p.lerp_(z.to(p.device), 1.0 - beta1)
                group["train_mode"] = True

    def _check_ready(self) -> None:
        if not self.train_mode:
            raise RuntimeError(
                "ScheduleFreeAdamW.step() was called in eval mode: call optimizer.train() before training "
                "steps and optimizer.eval() before evaluation (or add the ScheduleFreeMode callback)"
            )

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        state: dict[str, list[Tensor]], steps: list[Tensor],
    ) -> None:
        beta1, beta2 = group["betas"]
        zs, exp_avg_sqs = state["z"], state["exp_avg_sq"]
        weight_sums, lr_maxes = state["weight_sum"], state["lr_max"]

        t = torch.stack(steps)
        lr = t.new_full(t.shape, group["lr"])
        if group["warmup_steps"] > 0:
            lr = lr * (t / group["warmup_steps"]).clamp_(max=1.0)
        lr_max = torch.maximum(torch.stack(lr_maxes), lr)
        weight = t.pow(group["r"]) * lr_max.pow(group["weight_lr_power"])
        weight_sum = torch.stack(weight_sums) + weight
        ckp1 = torch.where(weight_sum > 0, weight / weight_sum, torch.zeros_like(weight))
        torch._foreach_copy_(lr_maxes, lr_max.unbind())
        torch._foreach_copy_(weight_sums, weight_sum.unbind())

        bc2 = bias_correction(steps, beta2).unbind()
        weight = ckp1.to(params[0].dtype).unbind()
        y_coef = (lr * (beta1 * (1.0 - ckp1) - 1.0)).unbind()
        z_coef = lr.neg().unbind()
        lists = {"param": params, "grad": grads, "z": zs, "exp_avg_sq": exp_avg_sqs}
        fast, rest = compiled.partition(self, lists)
        if fast:
            like = params[fast[0]]
            k = compiled.constants(like, beta2=beta2, c2=1.0 - beta2, eps=group["eps"], wd=group["weight_decay"])
            scale, skip = compiled.modifiers(*self._block_modifiers[:2], like)
            for chunk in compiled.chunks(fast):
                columns = [[v[i] for i in chunk] for v in (params, grads, zs, exp_avg_sqs, bc2, weight, y_coef, z_coef)]
                if not _SCHEDULE_FREE(*columns, k["beta2"], k["c2"], k["eps"], k["wd"], scale, skip,
                                      decayed=group["weight_decay"] != 0):
                    rest += chunk
            if not rest:
                return
            rest.sort()
            lists = compiled.subset(lists, rest)
            bc2, weight, y_coef, z_coef = ([v[i] for i in rest] for v in (bc2, weight, y_coef, z_coef))
        for owners, block in self._blocks(lists, ("param", "z", "exp_avg_sq")):
            self._update_block(group, block, pick(bc2, owners), pick(weight, owners), pick(y_coef, owners),
                               pick(z_coef, owners))

    def _update_block(
        self, group: dict[str, Any], block: dict[str, list[Tensor]], bc2: list[Tensor], weight: list[Tensor],
        y_coef: list[Tensor], z_coef: list[Tensor],
    ) -> None:
        """The rule on one cache-sized block (every temporary is block-sized)."""
        beta2 = group["betas"][1]
        params, grads, zs, exp_avg_sqs = block["param"], block["grad"], block["z"], block["exp_avg_sq"]
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        first, second = self._temporaries(block, 2)
        denom = fresh(first, torch._foreach_div, torch.div, exp_avg_sqs, bc2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        normalized = fresh(second, torch._foreach_div, torch.div, grads, denom)
        if group["weight_decay"] != 0:
            torch._foreach_add_(normalized, params, alpha=group["weight_decay"])

        torch._foreach_lerp_(params, zs, weight)
        y_step = fresh(first, torch._foreach_mul, torch.mul, normalized, y_coef)  # (denom is done with)
        torch._foreach_add_(params, y_step)
        torch._foreach_mul_(normalized, z_coef)
        torch._foreach_add_(zs, normalized)


def _schedule_free_rule(
    ps: list[Tensor], gs: list[Tensor], zs: list[Tensor], vs: list[Tensor], bc2s: list[Tensor], weights: list[Tensor],
    y_coefs: list[Tensor], z_coefs: list[Tensor], beta2: Tensor, c2: Tensor, eps: Tensor, wd: Tensor,
    scale: Tensor | None, skip: Tensor, *, decayed: bool,
) -> None:
    """:meth:`ScheduleFreeAdamW._update_block`'s ops, fused per tensor (``rounded`` where eager rounds a
    product before adding it)."""
    for j, (p, g, z, v) in enumerate(zip(ps, gs, zs, vs)):
        g = compiled.scaled_grad(g, scale)
        new_v = compiled.rounded(skip, v * beta2) + (c2 * g) * g  # eager addcmul: one FMA
        normalized = g / ((new_v / bc2s[j]).sqrt() + eps)
        if decayed:
            normalized = normalized + p * wd
        new_p = torch.lerp(p, z, weights[j])
        new_p = new_p + compiled.rounded(skip, normalized * y_coefs[j])
        new_z = z + compiled.rounded(skip, normalized * z_coefs[j])
        for old, new in ((p, new_p), (z, new_z), (v, new_v)):
            old.copy_(compiled.select(skip, old, new))


#: Contracted, with the products eager rounds kept apart: eager's lerp, addcmul and add(alpha=) are FMAs.
_SCHEDULE_FREE = compiled.CompiledRule(_schedule_free_rule, contract=True)
