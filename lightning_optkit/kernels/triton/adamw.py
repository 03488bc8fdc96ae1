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
from lightning_optkit.kernels.triton.chunks import (
    bf16_nearest,
    bf16_stochastic,
    chunk_offsets,
    load_f32,
    program_chunk,
    scaled_grad,
    store,
    tensor_pointer,
)
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
    t, start, n = program_chunk(chunk_tensor, chunk_start, numels, skip_ptr, HAS_SKIP, ALIGNED, BLOCK)
    p_ptr = tensor_pointer(state_ptrs, t, P_REF, ALIGNED)
    m_ptr = tensor_pointer(state_ptrs + n_tensors, t, S_REF, ALIGNED)
    v_ptr = tensor_pointer(state_ptrs + 2 * n_tensors, t, S_REF, ALIGNED)
    if AMSGRAD:
        vmax_ptr = tensor_pointer(state_ptrs + 3 * n_tensors, t, S_REF, ALIGNED)
    g_ptr = tensor_pointer(grad_ptrs, t, P_REF, ALIGNED)
    offs, mask, full = chunk_offsets(start, n, BLOCK)

    p = load_f32(p_ptr, offs, mask, full)
    g = load_f32(g_ptr, offs, mask, full)
    m = load_f32(m_ptr, offs, mask, full)
    v = load_f32(v_ptr, offs, mask, full)
    g = scaled_grad(g, mult_ptr, HAS_MULT, MAXIMIZE)
    lr = tl.load(lr_ptr)
    step_size = tl.load(step_size_ptr + t)
    bc2_sqrt = tl.load(bc2_sqrt_ptr + t)

    p = p * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    if AMSGRAD:
        vmax = tl.maximum(load_f32(vmax_ptr, offs, mask, full), v)
        denom = tl.sqrt(vmax) / bc2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)

    if BF16_PARAMS:
        if STOCHASTIC:
            p = bf16_stochastic(p, seed_ptr, BLOCK)
        else:
            p = bf16_nearest(p)
    store(p_ptr, offs, p, mask, full)
    store(m_ptr, offs, m, mask, full)
    store(v_ptr, offs, v, mask, full)
    if AMSGRAD:
        store(vmax_ptr, offs, vmax, mask, full)


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
