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
    HAS_MULT: tl.constexpr, HAS_SKIP: tl.constexpr, BF16_PARAMS: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    if HAS_SKIP:
        n = tl.where(tl.load(skip_ptr) == 0.0, n, 0)  # skipped: every element masked off
    p_ptr = tl.load(state_ptrs + t).to(tl.pointer_type(P_REF.dtype.element_ty))
    g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(P_REF.dtype.element_ty))
    b_ptr = tl.load(state_ptrs + t).to(tl.pointer_type(S_REF.dtype.element_ty))
    if HAS_MOMENTUM:
        b_ptr = tl.load(state_ptrs + n_tensors + t).to(tl.pointer_type(S_REF.dtype.element_ty))
    if ALIGNED:  # host-checked 16-byte alignment: lets the compiler vectorise (see adamw.py)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    full = start + BLOCK <= n

    if full:
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MULT:
        g = g * tl.load(mult_ptr)
    if MAXIMIZE:
        g = -g
    g = g + weight_decay * p
    if HAS_MOMENTUM:
        if full:
            buf = tl.load(b_ptr + offs).to(tl.float32)
        else:
            buf = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        buf = buf * momentum + g
        if full:
            tl.store(b_ptr + offs, buf.to(S_REF.dtype.element_ty))
        else:
            tl.store(b_ptr + offs, buf.to(S_REF.dtype.element_ty), mask=mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - tl.load(lr_ptr) * g
    if BF16_PARAMS:
        # Round to nearest even by integer arithmetic (see adamw.py).
        bits = p.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        p_out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        p_out = p.to(P_REF.dtype.element_ty)
    if full:
        tl.store(p_ptr + offs, p_out)
    else:
        tl.store(p_ptr + offs, p_out, mask=mask)


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
