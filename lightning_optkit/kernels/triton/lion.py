"""Lion (sign of interpolated momentum, decoupled weight decay) as one Triton launch per tensor group."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from lightning_optkit.kernels.triton.build import device_kernel
from lightning_optkit.kernels.triton.chunks import (
    bf16_nearest,
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
def _lion_kernel(
    state_ptrs, grad_ptrs, numels, chunk_tensor, chunk_start, n_tensors,
    lr_ptr, mult_ptr, skip_ptr, beta1, beta2, weight_decay,
    P_REF, S_REF,
    HAS_MULT: tl.constexpr, HAS_SKIP: tl.constexpr, BF16_PARAMS: tl.constexpr,
    MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, n = program_chunk(chunk_tensor, chunk_start, numels, skip_ptr, HAS_SKIP, ALIGNED, BLOCK)
    p_ptr = tensor_pointer(state_ptrs, t, P_REF, ALIGNED)
    m_ptr = tensor_pointer(state_ptrs + n_tensors, t, S_REF, ALIGNED)
    g_ptr = tensor_pointer(grad_ptrs, t, P_REF, ALIGNED)
    offs, mask, full = chunk_offsets(start, n, BLOCK)

    p = load_f32(p_ptr, offs, mask, full)
    g = load_f32(g_ptr, offs, mask, full)
    m = load_f32(m_ptr, offs, mask, full)
    g = scaled_grad(g, mult_ptr, HAS_MULT, MAXIMIZE)
    lr = tl.load(lr_ptr)
    mix = beta1 * m + (1.0 - beta1) * g
    direction = tl.where(mix > 0.0, 1.0, tl.where(mix < 0.0, -1.0, 0.0))
    p = p * (1.0 - lr * weight_decay) - lr * direction
    m = beta2 * m + (1.0 - beta2) * g
    if BF16_PARAMS:
        p = bf16_nearest(p)
    store(p_ptr, offs, p, mask, full)
    store(m_ptr, offs, m, mask, full)


def triton_lion(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor], *,
    lr: float | torch.Tensor, beta1: float, beta2: float, weight_decay: float, maximize: bool,
    grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
) -> None:
    """One launch over contiguous same-dtype, same-device tensors."""
    device = params[0].device
    lr_t = device_scalar(lr, device)
    mult, has_mult = optional_scalar(grad_scale, device, lr_t)
    skip_t, has_skip = optional_scalar(skip, device, lr_t)
    state_ptrs, states_aligned = pointer_table([params, exp_avgs], device)
    grad_ptrs, grads_aligned = pointer_table([grads], device)
    chunks = chunk_table([p.numel() for p in params], device)
    _lion_kernel.for_device(device)[(chunks.n_chunks,)](
        state_ptrs, grad_ptrs, chunks.numels, chunks.chunk_tensor, chunks.chunk_start, chunks.n_tensors,
        lr_t, mult, skip_t, beta1, beta2, weight_decay,
        params[0], exp_avgs[0],
        HAS_MULT=has_mult, HAS_SKIP=has_skip, BF16_PARAMS=params[0].dtype == torch.bfloat16,
        MAXIMIZE=maximize, ALIGNED=states_aligned and grads_aligned, BLOCK=chunks.block, num_warps=NUM_WARPS,
    )
