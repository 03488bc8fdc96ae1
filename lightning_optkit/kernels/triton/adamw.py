"""AdamW (torch.optim.AdamW semantics, incl. amsgrad and maximize) as one Triton launch per tensor group.

Math in fp32 for fp32/bf16/fp16 parameters; moments are fp32. ``lr``, the per-tensor step size
``lr / (1 - beta1**step)`` and ``sqrt(1 - beta2**step)`` are device tensors (bias corrections are
computed in float64 by torch ops, not in the kernel, which keeps the kernel free of ``pow`` and exact
for small step counts), so the launch is CUDA-graph capturable and needs no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from lightning_optkit.kernels.triton.build import device_kernel
from lightning_optkit.kernels.triton.common import NUM_WARPS, device_scalar, optional_scalar
from lightning_optkit.kernels.triton.tables import chunk_table, pointer_table


@device_kernel
def _adamw_kernel(
    state_ptrs, grad_ptrs, numels, chunk_tensor, chunk_start, n_tensors,
    lr_ptr, step_size_ptr, bc2_sqrt_ptr, mult_ptr, skip_ptr, seed_ptr,
    beta1, beta2, eps, weight_decay,
    P_REF, S_REF,
    HAS_MULT: tl.constexpr, HAS_SKIP: tl.constexpr, BF16_PARAMS: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    if HAS_SKIP:
        n = tl.where(tl.load(skip_ptr) == 0.0, n, 0)  # skipped: every element masked off
    p_ptr = tl.load(state_ptrs + t).to(tl.pointer_type(P_REF.dtype.element_ty))
    m_ptr = tl.load(state_ptrs + n_tensors + t).to(tl.pointer_type(S_REF.dtype.element_ty))
    v_ptr = tl.load(state_ptrs + 2 * n_tensors + t).to(tl.pointer_type(S_REF.dtype.element_ty))
    vmax_ptr = m_ptr
    if AMSGRAD:
        vmax_ptr = tl.load(state_ptrs + 3 * n_tensors + t).to(tl.pointer_type(S_REF.dtype.element_ty))
    g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(P_REF.dtype.element_ty))
    if ALIGNED:
        # Pointers loaded from a table carry no alignment facts; these (checked on the host) let the
        # compiler emit 16-byte vector accesses.
        p_ptr = tl.multiple_of(p_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    full = start + BLOCK <= n  # interior chunk: unmasked (vectorisable) accesses

    if full:
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs).to(tl.float32)
        v = tl.load(v_ptr + offs).to(tl.float32)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MULT:
        g = g * tl.load(mult_ptr)
    if MAXIMIZE:
        g = -g
    lr = tl.load(lr_ptr)
    step_size = tl.load(step_size_ptr + t)
    bc2_sqrt = tl.load(bc2_sqrt_ptr + t)

    p = p * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    if AMSGRAD:
        if full:
            vmax = tl.load(vmax_ptr + offs).to(tl.float32)
        else:
            vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vmax = tl.maximum(vmax, v)
        denom = tl.sqrt(vmax) / bc2_sqrt + eps
    else:
        vmax = v
        denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)

    if BF16_PARAMS:
        # Round to nearest even by integer arithmetic: exact on GPU and in the interpreter (whose
        # fp32 -> bf16 cast truncates).
        bits = p.to(tl.uint32, bitcast=True)
        nearest = bits + 0x7FFF + ((bits >> 16) & 1)
        if STOCHASTIC:
            # Stochastic rounding: add uniform 16-bit noise below the kept bits, then truncate, so
            # E[bf16(p)] = p. Noise is a lowbias32 hash of (element, step seed): plain integer ops,
            # since tl.randint cannot run in an interpreted kernel built after triton's import.
            x = (c * BLOCK + tl.arange(0, BLOCK)).to(tl.uint32) + tl.load(seed_ptr).to(tl.uint32) * 0x9E3779B9
            x = (x ^ (x >> 16)) * 0x7FEB352D
            x = (x ^ (x >> 15)) * 0x846CA68B
            x = x ^ (x >> 16)
            finite = (bits & 0x7F800000) != 0x7F800000
            nearest = tl.where(finite, bits + (x & 0xFFFF), nearest)
        bits = nearest >> 16
        p_out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        p_out = p.to(P_REF.dtype.element_ty)
    if full:
        tl.store(p_ptr + offs, p_out)
        tl.store(m_ptr + offs, m.to(S_REF.dtype.element_ty))
        tl.store(v_ptr + offs, v.to(S_REF.dtype.element_ty))
        if AMSGRAD:
            tl.store(vmax_ptr + offs, vmax.to(S_REF.dtype.element_ty))
    else:
        tl.store(p_ptr + offs, p_out, mask=mask)
        tl.store(m_ptr + offs, m.to(S_REF.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(S_REF.dtype.element_ty), mask=mask)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, vmax.to(S_REF.dtype.element_ty), mask=mask)


def triton_adamw(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor], max_exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
    *, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    maximize: bool, grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
    sr_seed: torch.Tensor | None = None,
) -> None:
    """One launch over contiguous same-dtype, same-device tensors. ``steps`` are advanced unless skipped.

    ``sr_seed`` (a 0-d integer device tensor) turns on stochastic rounding of bf16 parameter stores.
    """
    device = params[0].device
    increment = 1.0 if skip is None else 1.0 - skip.to(device=device, dtype=torch.float32).reshape(())
    torch._foreach_add_(list(steps), increment)  # private foreach op (no public multi-tensor add)
    step64 = torch.stack(list(steps)).to(torch.float64)
    lr_t = device_scalar(lr, device)
    step_size = (lr_t.double() / (1.0 - torch.pow(beta1, step64))).float()
    bc2_sqrt = (1.0 - torch.pow(beta2, step64)).sqrt().float()
    mult, has_mult = optional_scalar(grad_scale, device, lr_t)
    skip_t, has_skip = optional_scalar(skip, device, lr_t)

    rows = [params, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    state_ptrs, states_aligned = pointer_table(rows, device)
    grad_ptrs, grads_aligned = pointer_table([grads], device)
    chunks = chunk_table([p.numel() for p in params], device)
    stochastic = sr_seed is not None and params[0].dtype == torch.bfloat16
    seed = sr_seed.to(device, non_blocking=True) if stochastic else chunks.chunk_start  # placeholder
    _adamw_kernel.for_device(device)[(chunks.n_chunks,)](
        state_ptrs, grad_ptrs, chunks.numels, chunks.chunk_tensor, chunks.chunk_start, chunks.n_tensors,
        lr_t, step_size, bc2_sqrt, mult, skip_t, seed,
        beta1, beta2, eps, weight_decay,
        params[0], exp_avgs[0],
        HAS_MULT=has_mult, HAS_SKIP=has_skip, BF16_PARAMS=params[0].dtype == torch.bfloat16,
        AMSGRAD=amsgrad, MAXIMIZE=maximize, ALIGNED=states_aligned and grads_aligned, STOCHASTIC=stochastic,
        BLOCK=chunks.block, num_warps=NUM_WARPS,
    )
