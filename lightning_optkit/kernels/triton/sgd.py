"""SGD with momentum (torch.optim.SGD semantics, dampening 0, incl. nesterov) as one Triton launch."""

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
def _sgd_kernel(
    state_ptrs, grad_ptrs, numels, chunk_tensor, chunk_start, n_tensors,
    lr_ptr, mult_ptr, skip_ptr, momentum, weight_decay,
    P_REF, S_REF,
    HAS_MULT: tl.constexpr, HAS_SKIP: tl.constexpr, BF16_PARAMS: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, start, n = program_chunk(chunk_tensor, chunk_start, numels, skip_ptr, HAS_SKIP, ALIGNED, BLOCK)
    p_ptr = tensor_pointer(state_ptrs, t, P_REF, ALIGNED)
    g_ptr = tensor_pointer(grad_ptrs, t, P_REF, ALIGNED)
    if HAS_MOMENTUM:
        b_ptr = tensor_pointer(state_ptrs + n_tensors, t, S_REF, ALIGNED)
    offs, mask, full = chunk_offsets(start, n, BLOCK)

    p = load_f32(p_ptr, offs, mask, full)
    g = load_f32(g_ptr, offs, mask, full)
    g = scaled_grad(g, mult_ptr, HAS_MULT, MAXIMIZE) + weight_decay * p
    if HAS_MOMENTUM:
        buf = load_f32(b_ptr, offs, mask, full) * momentum + g
        store(b_ptr, offs, buf, mask, full)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - tl.load(lr_ptr) * g
    if BF16_PARAMS:
        p = bf16_nearest(p)
    store(p_ptr, offs, p, mask, full)


def triton_sgd(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor], *,
    lr: float | torch.Tensor, momentum: float, weight_decay: float, nesterov: bool, maximize: bool,
    grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
) -> None:
    """One launch over contiguous same-dtype, same-device tensors; ``bufs`` may be empty when momentum is 0."""
    device = params[0].device
    lr_t = device_scalar(lr, device)
    mult, has_mult = optional_scalar(grad_scale, device, lr_t)
    skip_t, has_skip = optional_scalar(skip, device, lr_t)
    has_momentum = momentum != 0.0
    rows = [params, bufs] if has_momentum else [params]
    state_ptrs, states_aligned = pointer_table(rows, device)
    grad_ptrs, grads_aligned = pointer_table([grads], device)
    chunks = chunk_table([p.numel() for p in params], device)
    _sgd_kernel.for_device(device)[(chunks.n_chunks,)](
        state_ptrs, grad_ptrs, chunks.numels, chunks.chunk_tensor, chunks.chunk_start, chunks.n_tensors,
        lr_t, mult, skip_t, momentum, weight_decay,
        params[0], bufs[0] if has_momentum else params[0],
        HAS_MULT=has_mult, HAS_SKIP=has_skip, BF16_PARAMS=params[0].dtype == torch.bfloat16,
        HAS_MOMENTUM=has_momentum, NESTEROV=nesterov, ALIGNED=states_aligned and grads_aligned,
        MAXIMIZE=maximize, BLOCK=chunks.block, num_warps=NUM_WARPS,
    )
