"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_optkit import validation
from lightning_optkit.kernels import compiled, lamb_native
from lightning_optkit.optim.base import KitOptimizer, betas, bias_correction, non_negative
from lightning_optkit.optim.blocks import fresh, pick
from lightning_optkit.registry import register_optimizer
from lightning_optkit.sharding import any_sharded


@register_optimizer("lamb")
class LAMB(KitOptimizer):
    """LAMB: Adam's bias-corrected direction with a per-tensor trust ratio (the paper's Algorithm 2).

    Per parameter tensor: ``m <- b1*m + (1-b1)*g``, ``v <- b2*v + (1-b2)*g^2``,
    ``u = (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps) + wd*p``,
    ``r = ||p|| / ||u||`` (r = 1 when either norm is 0), clamped to ``[0, max_trust_ratio]``,
    ``p <- p - lr * r * u``. Weight decay is inside ``u`` (so it is scaled by the trust ratio, as in
    the paper). Gradients are not clipped here (use the kit's clipping callbacks). The trust ratio is
    applied to every tensor; put biases and norm gains in a group with weight_decay=0 if you like, as
    usual. Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_trust_ratio=10.
    State: ``exp_avg``, ``exp_avg_sq``, ``step``.
    """

    validators = {"lr": non_negative, "betas": betas(2), "eps": non_negative, "weight_decay": non_negative}
    state_names = ("exp_avg", "exp_avg_sq")
    blocked = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_trust_ratio: float = 10.0,
        foreach: bool | None = None,
    ) -> None:
        validation.number("max_trust_ratio", max_trust_ratio, positive=True, strings=False,
                          fix="pass a number > 0 (10.0 is common)")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         max_trust_ratio=max_trust_ratio, foreach=foreach)

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        state: dict[str, list[Tensor]], steps: list[Tensor],
    ) -> None:
        bc1 = bias_correction(steps, group["betas"][0]).unbind()
        bc2 = bias_correction(steps, group["betas"][1]).unbind()
        # Under FSDP2 the rule sees local shards and the norms need one collective: keep the lists whole.
        split = not any_sharded(getattr(self, "_bucket_params", ()))
        lists = {"param": params, "grad": grads, **state}
        # Native (CPU, large tensors): the whole rule of every such tensor in one call, tensor by tensor while
        # it is in cache (kernels/lamb_native.c); then the compiled rule, then the eager one, for the others.
        native, rest = lamb_native.partition(self, lists) if split else ([], list(range(len(params))))
        if native:
            self._update_native(group, lists, native, bc1, bc2)
            if not rest:
                return
            lists, bc1, bc2 = compiled.subset(lists, rest), [bc1[i] for i in rest], [bc2[i] for i in rest]
        # u goes into a persistent buffer per parameter (4 bytes per fp32 param, allocated once; not state):
        # pieces cut like the others. A gradient-sized fresh tensor per step would be page faults.
        if split:
            lists["update"] = self._update_buffers(lists["param"])
        # Compiled (CPU, large tensors): the whole rule per tensor while it is in cache: one fused pass for m, v
        # and u, the two norms, the trust ratio, one fused pass for p.
        count = len(lists["param"])
        fast, rest = compiled.partition(self, lists) if split else ([], list(range(count)))
        rest += self._update_compiled(group, lists, fast, bc1, bc2)
        if not rest:
            return
        rest.sort()
        lists = compiled.subset(lists, rest)
        bc1, bc2 = [bc1[i] for i in rest], [bc2[i] for i in rest]
        count = len(rest)
        # Pass 1: the moments, then the direction u block by block (kept for pass 2), and each piece's norms
        # (of p and u).
        pieces: list[int] = []
        param_norms: list[Tensor] = []
        update_norms: list[Tensor] = []
        updates: list[list[Tensor]] = []
        for owners, block in self._blocks(lists, ("exp_avg", "exp_avg_sq"), split=split):
            update = self._direction(group, block, pick(bc1, owners), pick(bc2, owners),
                                     self._temporaries(block, 1)[0])
            updates.append(update)
            if split:
                pieces += owners
                param_norms += torch._foreach_norm(block["param"])
                update_norms += torch._foreach_norm(update)
            else:
                norms = self.whole_tensor_norms([*block["param"], *update])  # whole tensors: one collective
                param_norms, update_norms = norms[:count], norms[count:]
        param_norm = _per_tensor_norm(param_norms, pieces, count)
        update_norm = _per_tensor_norm(update_norms, pieces, count)
        usable = (param_norm > 0) & (update_norm > 0)
        ratio = torch.where(usable, param_norm / update_norm, torch.ones_like(param_norm))
        ratio = ratio.clamp_(max=group["max_trust_ratio"]).mul_(-group["lr"]).unbind()
        # Pass 2: p <- p - lr * r * u, block by block (the same blocks as pass 1).
        blocks = self._blocks(lists, ("param",), scale_grads=False, split=split)  # the same lists: the same cuts
        for (owners, block), update in zip(blocks, updates):
            torch._foreach_mul_(update, pick(ratio, owners))
            torch._foreach_add_(block["param"], update)

    def _update_native(
        self, group: dict[str, Any], lists: dict[str, list[Tensor]], native: list[int], bc1: list[Tensor],
        bc2: list[Tensor],
    ) -> None:
        """The rule on the ``native`` tensors in one kernel call (:mod:`~lightning_optkit.kernels.lamb_native`)."""
        beta1, beta2 = group["betas"]
        params = [lists["param"][i] for i in native]
        like = params[0]
        scale, skip = self._block_modifiers[:2]  # CPU 0-d tensors or None (the kernel takes None for either)
        scale = None if scale is None else scale.to(like.dtype)
        lamb_native.step(
            lamb_native.library(self), params, *([lists[name][i] for i in native] for name in
                                                 ("grad", "exp_avg", "exp_avg_sq")),
            [bc1[i].to(like.dtype) for i in native], [bc2[i].to(like.dtype) for i in native], scale, skip,
            self._native_scratch(params), c1=1.0 - beta1, beta2=beta2, c2=1.0 - beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], max_trust_ratio=group["max_trust_ratio"], lr=group["lr"])

    def _native_scratch(self, params: list[Tensor]) -> Tensor:
        """The native kernel's scratch rows for the params' dtype (persistent, one per dtype; grown, never shrunk,
        when a larger tensor or more threads come)."""
        threads, row = lamb_native.scratch_shape(params)
        rows = self.__dict__.setdefault("_native_rows", {})
        scratch = rows.get(params[0].dtype)
        if scratch is None or scratch.shape[0] < threads or scratch.shape[1] < row:
            if scratch is not None:
                threads, row = max(threads, scratch.shape[0]), max(row, scratch.shape[1])
            scratch = rows[params[0].dtype] = torch.empty(threads, row, dtype=params[0].dtype)
        return scratch

    def _update_compiled(
        self, group: dict[str, Any], lists: dict[str, list[Tensor]], fast: list[int], bc1: list[Tensor],
        bc2: list[Tensor],
    ) -> list[int]:
        """The rule on the ``fast`` tensors, a chunk at a time; returns those left to the eager rule."""
        if not fast:
            return []
        beta1, beta2 = group["betas"]
        like = lists["param"][fast[0]]
        k = compiled.constants(like, c1=1.0 - beta1, beta2=beta2, c2=1.0 - beta2, eps=group["eps"],
                               wd=group["weight_decay"])
        scale, skip = compiled.modifiers(*self._block_modifiers[:2], like)
        left = []
        for chunk in compiled.chunks(fast):
            ps, us = [lists["param"][i] for i in chunk], [lists["update"][i] for i in chunk]
            columns = [[lists[name][i] for i in chunk] for name in ("grad", "exp_avg", "exp_avg_sq")]
            if not _LAMB_DIRECTION(ps, *columns, us, [bc1[i] for i in chunk], [bc2[i] for i in chunk], k["c1"],
                                   k["beta2"], k["c2"], k["eps"], k["wd"], scale, skip,
                                   decayed=group["weight_decay"] != 0):
                left += chunk
                continue
            norms = torch.stack(torch._foreach_norm([*ps, *us]))
            param_norm, update_norm = norms[:len(chunk)], norms[len(chunk):]
            usable = (param_norm > 0) & (update_norm > 0)  # the eager rule's ratio, op for op
            ratio = torch.where(usable, param_norm / update_norm, torch.ones_like(param_norm))
            ratios = ratio.clamp_(max=group["max_trust_ratio"]).mul_(-group["lr"]).unbind()
            if not _LAMB_APPLY(ps, us, list(ratios), skip):  # compiling failed since pass 1: the same ops, eagerly
                for p, u, r in zip(ps, us, ratios):
                    torch.where(skip, p, p + u * r, out=p)
        return left

    def _update_buffers(self, params: list[Tensor]) -> list[Tensor]:
        buffers = self.__dict__.setdefault("_updates", {})
        out = []
        for p in params:
            buffer = buffers.get(p)
            if buffer is None or buffer.shape != p.shape or buffer.dtype != p.dtype:
                buffer = buffers[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
            out.append(buffer)
        return out

    def scratch_nbytes(self) -> int:
        """Block buffers, the per-parameter direction buffers and the native kernel's scratch rows."""
        buffers = [*self.__dict__.get("_updates", {}).values(), *self.__dict__.get("_native_rows", {}).values()]
        return super().scratch_nbytes() + sum(b.numel() * b.element_size() for b in buffers)

    @staticmethod
    def _direction(
        group: dict[str, Any], block: dict[str, list[Tensor]], bc1: list[Tensor], bc2: list[Tensor],
        scratch: Tensor | None,
    ) -> list[Tensor]:
        """Update m and v on one block, then ``u = (m/bc1) / (sqrt(v/bc2) + eps) + wd*p``."""
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs, grads = block["exp_avg"], block["exp_avg_sq"], block["grad"]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = fresh(scratch, torch._foreach_div, torch.div, exp_avg_sqs, bc2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        out = block["update"][0] if len(exp_avgs) == 1 and "update" in block else None
        update = fresh(out, torch._foreach_div, torch.div, exp_avgs, bc1)
        torch._foreach_div_(update, denom)
        if group["weight_decay"] != 0:
            torch._foreach_add_(update, block["param"], alpha=group["weight_decay"])
        return update


def _per_tensor_norm(norms: list[Tensor], pieces: list[int], count: int) -> Tensor:
    """Per-tensor 2-norms from the norms of their pieces (``pieces[j]``: the tensor of ``norms[j]``); a tensor
    in one piece keeps its norm exactly. ``pieces`` empty: ``norms`` are already per tensor."""
    stacked = torch.stack(norms)
    if not pieces or len(pieces) == count:
        return stacked
    owners = torch.tensor(pieces, device=stacked.device)
    squares = torch.zeros(count, dtype=stacked.dtype, device=stacked.device)
    return squares.index_add_(0, owners, stacked.square()).sqrt_()


def _lamb_direction_rule(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], us: list[Tensor], bc1s: list[Tensor],
    bc2s: list[Tensor], c1: Tensor, beta2: Tensor, c2: Tensor, eps: Tensor, wd: Tensor, scale: Tensor | None,
    skip: Tensor, *, decayed: bool,
) -> None:
    """:meth:`LAMB._direction`'s ops, fused per tensor: the moments and ``u`` (``rounded`` where eager rounds a
    product before adding it)."""
    for j, (p, g, m, v, u) in enumerate(zip(ps, gs, ms, vs, us)):
        g = compiled.scaled_grad(g, scale)
        new_m = torch.lerp(m, g, c1)
        new_v = compiled.rounded(skip, v * beta2) + (c2 * g) * g  # eager addcmul: one FMA
        update = new_m / bc1s[j] / ((new_v / bc2s[j]).sqrt() + eps)
        if decayed:
            update = update + p * wd
        u.copy_(update)
        m.copy_(compiled.select(skip, m, new_m))
        v.copy_(compiled.select(skip, v, new_v))


def _lamb_apply_rule(ps: list[Tensor], us: list[Tensor], ratios: list[Tensor], skip: Tensor) -> None:
    """``p + u * ratio`` per tensor (``ratio`` = -lr * trust ratio), the product rounded first as eager does."""
    for p, u, ratio in zip(ps, us, ratios):
        p.copy_(compiled.select(skip, p, p + compiled.rounded(skip, u * ratio)))


#: Contracted, with the products eager rounds kept apart: eager's lerp, addcmul and add(alpha=) are FMAs.
_LAMB_DIRECTION = compiled.CompiledRule(_lamb_direction_rule, contract=True)
_LAMB_APPLY = compiled.CompiledRule(_lamb_apply_rule, contract=True)
