"""The torch path: torch's own fused kernels (AdamW, SGD) and foreach ops (Lion).

Used on CPU and wherever Triton is missing. Clipping needs no extra pass: the clip coefficient goes in
as ``grad_scale`` (a *divisor* for torch's fused kernels, so its reciprocal is passed) and the skip flag
as ``found_inf`` (the kernels then leave every element untouched; the step counters are advanced by
``1 - found_inf`` before the kernel, which reads them only when it does not skip). The kernels take a
float32 divisor only, so float64 gradients are instead multiplied by the float64 coefficient in place
first (one extra pass, exact: a float32 reciprocal would be 1e-8 off). Note that torch's
fused kernels write the scaled gradient back into ``.grad`` when ``grad_scale`` is given, as
``clip_grad_norm_`` would; the Lion path does the same.

On CPU a foreach op is a C++ loop of per-tensor ops, so the cost is ops x tensors: the Lion path keeps
the op count low, allocates one scratch tensor per parameter, and passes scalars as 0-d tensors
(a Python number is wrapped into a new tensor for every tensor of the list).

``torch._fused_adamw_``, ``torch._fused_sgd_`` and the ``torch._foreach_*`` ops are private torch ops
(there is no public multi-tensor API); they are used only in this module, with the signatures of
torch 2.13 (``torch/_C/_VariableFunctions.pyi``) as called by ``torch/optim/adam.py`` and ``sgd.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_optkit.optim.blocks import split_blocks

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _working_lists(lists: Sequence[Sequence[torch.Tensor]]) -> tuple[list[list[torch.Tensor]], bool]:
    """The lists as torch's fused kernels want them: one dtype throughout.

    When params are bf16/fp16 or a state list has another dtype than the params, every list is copied
    to fp32 (math in fp32, like the Triton kernels); the caller writes the copies back with
    :func:`_write_back`. Otherwise the lists are returned as they are.
    """
    dtype = lists[0][0].dtype
    # Lists are homogeneous per group (grouped by param dtype; states created alike), so the first
    # tensor of each list decides; a stray dtype makes torch's kernel raise, never compute wrongly.
    if dtype not in LOW_PRECISION and all(tensors[0].dtype == dtype for tensors in lists if tensors):
        return [list(tensors) for tensors in lists], False
    return [[t.float() for t in tensors] for tensors in lists], True


def _write_back(targets: Sequence[Sequence[torch.Tensor]], work: Sequence[Sequence[torch.Tensor]]) -> None:
    for dst, src in zip(targets, work):
        if dst:
            torch._foreach_copy_(list(dst), list(src))


def _divisor(grad_scale: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The float32 divisor torch's fused kernels take for ``grad_scale`` (its reciprocal, rounded once)."""
    if grad_scale is None:
        return None
    scale = grad_scale.to(device=device, dtype=torch.float64, non_blocking=True)
    return torch.reciprocal(scale).float()


def _apply_scale(grads: list[torch.Tensor], grad_scale: torch.Tensor | None,
                 found_inf: torch.Tensor | None) -> torch.Tensor | None:
    """What to pass torch's fused kernel as ``grad_scale``, scaling float64 gradients here first.

    The kernels take a float32 divisor only, so for float64 gradients the float64 scale is multiplied
    into them in place (one extra pass, exact: the same product the foreach path and
    ``clip_grad_norm_`` form; not on a skipped step) and no divisor is passed. Otherwise the divisor.
    """
    if grad_scale is None or grads[0].dtype != torch.float64:
        return _divisor(grad_scale, grads[0].device)
    scale = grad_scale.to(device=grads[0].device, dtype=torch.float64, non_blocking=True).reshape(())
    if found_inf is not None:
        scale = torch.where(found_inf.reshape(()) != 0, torch.ones_like(scale), scale)
    torch._foreach_mul_(grads, scale)
    return None


def _found_inf(skip: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The skip flag as torch's fused kernels read ``found_inf``: exactly 1.0 skips, so any nonzero
    (2, 0.5, NaN) becomes 1.0 first."""
    if skip is None:
        return None
    return skip.to(device=device, non_blocking=True).reshape(1).ne(0).to(torch.float32)


def torch_adamw(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor], max_exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
    *, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    maximize: bool, grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
) -> None:
    """``torch._fused_adamw_`` over one (device, dtype) group; low-precision params run in fp32 copies."""
    device = params[0].device
    states = [exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []]
    (work_p, work_g, work_m, work_v, work_vmax), copied = _working_lists([params, grads, *states])
    found_inf = _found_inf(skip, device)
    steps = list(steps)
    # One op with a 0-d tensor (a Python 1 is wrapped into a tensor per counter on CPU): +1, or +0 when
    # skipping (the kernel then reads no counter).
    increment = torch.ones((), device=device) if found_inf is None else 1.0 - found_inf.reshape(())
    torch._foreach_add_(steps, increment)
    torch._fused_adamw_(
        work_p, work_g, work_m, work_v, work_vmax, steps,
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
        maximize=maximize, grad_scale=_apply_scale(work_g, grad_scale, found_inf), found_inf=found_inf,
    )
    if copied:
        _write_back([params, *states], [work_p, work_m, work_v, work_vmax])


def torch_sgd(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor], *,
    lr: float | torch.Tensor, momentum: float, weight_decay: float, nesterov: bool, maximize: bool,
    grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
) -> None:
    """``torch._fused_sgd_`` (dampening 0) over one group.

    Zero-initialised buffers give exactly torch's first step (which copies the gradient).
    """
    device = params[0].device
    bufs = bufs if momentum != 0.0 else []
    (work_p, work_g, work_b), copied = _working_lists([params, grads, bufs])
    found_inf = _found_inf(skip, device)
    torch._fused_sgd_(
        work_p, work_g, work_b,
        weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=0.0, nesterov=nesterov,
        maximize=maximize, is_first_step=False,
        grad_scale=_apply_scale(work_g, grad_scale, found_inf), found_inf=found_inf,
    )
    if copied:
        _write_back([params, bufs], [work_p, work_b])


_BITS = {4: torch.int32, 8: torch.int64}


def _device_scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype and device, made by a fill (no host-to-device copy).

    Foreach ops given a 0-d tensor use it as is; given a Python number, torch's CPU fallback wraps the
    number into a fresh tensor for every tensor of the list (measured 2.5x the cost of the op itself).
    """
    return torch.full((), value, dtype=like.dtype, device=like.device)


def lion_lists(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], *,
    lr: float | torch.Tensor, beta1: float, beta2: float, weight_decay: float, maximize: bool = False,
    grad_scale: torch.Tensor | None = None, skip: torch.Tensor | None = None, grads_writable: bool = False,
) -> None:
    """Lion over same-dtype lists (fp32 or fp64) with foreach ops: one scratch tensor per parameter.

    The one sequence of operations both Lion paths run (``Lion()``'s foreach rule calls it with no scale
    or skip, ``Lion(fused=True)`` on the torch backend with them), so the two agree bit for bit:
    ``p -= (lr*wd) * p`` (not ``p *= 1 - lr*wd``: in float32 the rounding of ``1 - lr*wd`` would compound
    over steps; here it only touches the small term); ``p -= lr * sign(lerp(m, g, 1 - b1))``;
    ``m = lerp(m, g, 1 - b2)``.

    Per tensor, unguarded: 4 ops without weight decay (one allocates the direction), 6 with it (the
    decay term is formed in a second temporary first). ``skip`` adds a few in-place ops and no
    snapshot of the parameters: the decay term and the direction are set, on device, to +0.0 through
    their integer bit patterns (NaN-proof) and subtracted, and the new moment is formed in the scratch
    tensor and selected bitwise, so ``p - (+0.0)`` and the old moment leave every bit as it was (-0.0
    included). When ``skip`` is false the arithmetic is exactly the unguarded one.
    """
    like = params[0]
    keep = None if skip is None else ~skip.to(device=like.device, non_blocking=True).reshape(()).to(torch.bool)
    if grad_scale is not None:
        scale = grad_scale.to(device=like.device, dtype=like.dtype, non_blocking=True).reshape(())
        if keep is not None:
            scale = torch.where(keep, scale, torch.ones_like(scale))  # a skipped step leaves .grad alone
        if grads_writable:
            torch._foreach_mul_(grads, scale)  # as torch's fused kernels: the scaled gradient stays in .grad
        else:
            grads = torch._foreach_mul(grads, scale)
    if maximize:
        grads = torch._foreach_neg(grads)
    bits_dtype = _BITS[like.element_size()]
    keep_bits = None if keep is None else keep.to(bits_dtype)
    lr_t = lr.to(device=like.device, dtype=like.dtype, non_blocking=True).reshape(()) if isinstance(
        lr, torch.Tensor) else None

    if weight_decay != 0:
        rate = lr_t * weight_decay if lr_t is not None else _device_scalar(lr * weight_decay, like)
        scratch = torch._foreach_mul(params, rate)  # (lr*wd)*p, the one allocation
        if keep_bits is not None:
            torch._foreach_mul_([t.view(bits_dtype) for t in scratch], keep_bits)  # skip: +0.0
        torch._foreach_add_(params, scratch, alpha=-1.0)
    # the direction b1*m + (1-b1)*g as lerp(m, g, 1-b1), the peers' form (pytorch-optimizer, lion-pytorch's
    # foreach Lion: bit for bit without weight decay); a fresh tensor is one op where refilling the scratch would
    # be two (on CPU the lists are cache-sized blocks, so the allocation is small)
    direction = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_sign_(direction)
    bits = [d.view(bits_dtype) for d in direction]
    if keep_bits is not None:
        torch._foreach_mul_(bits, keep_bits)  # skip: direction := +0.0 (NaN included)
    if lr_t is None:
        torch._foreach_add_(params, direction, alpha=-float(lr))  # -0.0 for lr=0: p + (-0.0) == p
    else:
        torch._foreach_mul_(direction, -lr_t)
        torch._foreach_add_(params, direction)

    if keep_bits is None:
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta2)  # m + (1-b2)*(g-m)
        return
    # The direction tensors are scratch now: the new moment by the unguarded op, then m += (new - m) * keep
    # on the integer bit patterns (exact in two's complement wrap-around): the new moment, or m unchanged.
    torch._foreach_copy_(direction, exp_avgs)
    torch._foreach_lerp_(direction, grads, 1.0 - beta2)
    old_bits = [m.view(bits_dtype) for m in exp_avgs]
    torch._foreach_sub_(bits, old_bits)
    torch._foreach_mul_(bits, keep_bits)
    torch._foreach_add_(old_bits, bits)


def torch_lion(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor], *,
    lr: float | torch.Tensor, beta1: float, beta2: float, weight_decay: float, maximize: bool,
    grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
) -> None:
    """Lion over one group with foreach ops (torch has no fused Lion); scale and skip inside the same ops.

    fp32/fp64 groups update in place and, like torch's fused kernels, leave ``grads`` multiplied by
    ``grad_scale`` (not on a skipped step). bf16/fp16 params (or states of another dtype) run in fp32
    copies, written back after. A skipped step leaves params and ``exp_avgs`` bit-identical, with no host sync.
    """
    (work_p, work_g, work_m), copied = _working_lists([params, grads, exp_avgs])
    for _, (block_p, block_g, block_m) in split_blocks([work_p, work_g, work_m]):  # cache-sized pieces on CPU
        lion_lists(block_p, block_g, block_m, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                    maximize=maximize, grad_scale=grad_scale, skip=skip, grads_writable=not copied)
    if copied:
        _write_back([params, exp_avgs], [work_p, work_m])


# At and above this many elements a BLAS dot beats a norm kernel on CPU (2 threads: 2.3 us vs 2.6 us at 16k,
# 3.1 us vs 5.8 us at 64k); below it the per-call Python overhead of a dot loop dominates.
DOT_MIN_NUMEL = 16384


def torch_sum_of_squares(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squared entries of ``grads`` as a 0-d float64 device tensor.

    float64 tensors are summed in float64. Others with float32 arithmetic per tensor, each tensor's sum
    then taken to float64, so that many tensors together do not overflow float32 (a norm above 1.8e19);
    one float32 tensor whose own sum of squares exceeds the float32 range still gives inf here (scaling
    it would cost a second read of every gradient, which the Triton kernel avoids by scaling in
    registers).

    On CPU, large fp32 and all fp64 tensors use ``torch.dot(g, g)`` (BLAS): measured 5.2 ms for 33.8M fp32
    params on 2 cores, against 12.4 ms for per-tensor ``vector_norm`` and 11.4 ms for ``torch._foreach_norm``.
    The rest (small or low-precision tensors) go through one ``_foreach_norm`` call: 0.26 ms for 200 x 1k
    fp32 tensors against 0.50 ms for a loop of dots. Elsewhere one ``_foreach_norm`` launch per dtype
    covers the list. Inf/NaN entries propagate into the result.
    """
    grads = list(grads)
    wide = [g for g in grads if g.dtype == torch.float64]
    narrow = [g for g in grads if g.dtype != torch.float64]
    parts = []
    if grads[0].device.type != "cpu":
        for group, dtype in ((wide, torch.float64), (narrow, torch.float32)):
            if group:
                norms = torch.stack(torch._foreach_norm(group, 2, dtype=dtype)).double()
                parts.append(norms.square().sum())
        return torch.stack(parts).sum()
    rest = []
    for g in grads:
        if g.dtype == torch.float64 or (g.dtype == torch.float32 and g.numel() >= DOT_MIN_NUMEL):
            flat = g.reshape(-1)
            parts.append(torch.dot(flat, flat).double())
        else:
            rest.append(g)
    if rest:
        parts.append(torch.stack(torch._foreach_norm(rest, 2, dtype=torch.float32)).double().square().sum())
    return torch.stack(parts).sum()
