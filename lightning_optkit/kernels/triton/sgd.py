"""SGD with momentum (torch.optim.SGD semantics, dampening 0, incl. nesterov) as one Triton launch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from lightning_optkit.kernels.triton.build import device_kernel
from lightning_optkit.kernels.triton.common import NUM_WARPS, device_scalar, optional_scalar
from lightning_optkit.kernels.triton.tables import chunk_table, pointer_table


@device_kernel
def _sgd_kernel(
    state_ptrs, grad_ptrs, numels, chunk_tensor, chunk_start, n_tensors,
    lr_ptr, mult_ptr, skip_ptr, momentum, weight_decay,
    P_REF, S_REF,
    HAS_MULT: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_SKIP:
        mask = mask & (tl.load(skip_ptr) == 0.0)
    p_ptr = tl.load(state_ptrs + t).to(tl.pointer_type(P_REF.dtype.element_ty))
    g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(P_REF.dtype.element_ty))
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MULT:
        g = g * tl.load(mult_ptr)
    if MAXIMIZE:
        g = -g
    g = g + weight_decay * p
    if HAS_MOMENTUM:
        b_ptr = tl.load(state_ptrs + n_tensors + t).to(tl.pointer_type(S_REF.dtype.element_ty))
        buf = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        buf = buf * momentum + g
        tl.store(b_ptr + offs, buf.to(S_REF.dtype.element_ty), mask=mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - tl.load(lr_ptr) * g
    tl.store(p_ptr + offs, p.to(P_REF.dtype.element_ty), mask=mask)


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
    state_ptrs = pointer_table(rows, device)
    grad_ptrs = pointer_table([grads], device)
    chunks = chunk_table([p.numel() for p in params], device)
    _sgd_kernel.for_device(device)[(chunks.n_chunks,)](
        state_ptrs, grad_ptrs, chunks.numels, chunks.chunk_tensor, chunks.chunk_start, chunks.n_tensors,
        lr_t, mult, skip_t, momentum, weight_decay,
        params[0], bufs[0] if has_momentum else params[0],
        HAS_MULT=has_mult, HAS_SKIP=has_skip, HAS_MOMENTUM=has_momentum, NESTEROV=nesterov,
        MAXIMIZE=maximize, BLOCK=chunks.block, num_warps=NUM_WARPS,
    )
