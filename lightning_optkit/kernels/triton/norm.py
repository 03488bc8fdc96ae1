"""Sum of squares over a list of tensors in one launch (the first half of a global-norm clip).

Overflow-safe: each chunk scales its elements by its own largest magnitude before squaring (in
registers, no extra memory traffic), and the chunks' partial sums are combined in float64, so a float32
gradient whose squares or sum of squares exceed the float32 range still gives its finite norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

# tl.sum is itself a @triton.jit function, fixed as compiled or interpreted when triton is imported, so
# an interpreted kernel cannot call it unless TRITON_INTERPRET was set before that import. tl.reduce is
# a builtin both modes handle, and the interpreter maps this (private) combine function to numpy's sum.
from triton.language.standard import _elementwise_max, _sum_combine

from lightning_optkit.kernels.triton.build import device_kernel
from lightning_optkit.kernels.triton.common import NUM_WARPS
from lightning_optkit.kernels.triton.tables import chunk_table, pointer_table


@device_kernel
def _sumsq_kernel(grad_ptrs, numels, chunk_tensor, chunk_start, partial_max, partial_sum, G_REF,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(G_REF.dtype.element_ty))
    if ALIGNED:  # host-checked 16-byte alignment: lets the compiler vectorise (see adamw.py)
        g_ptr = tl.multiple_of(g_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    # Scaled by the chunk's largest magnitude m: (g/m)^2 <= 1 cannot overflow. m = 0 (all zeros) scales
    # by 0; an inf (m = inf) or NaN entry makes the scaled sum NaN, so non-finite gradients propagate.
    m = tl.reduce(tl.abs(g), 0, _elementwise_max)
    inv = tl.where(m > 0.0, 1.0 / m, 0.0)
    scaled = g * inv
    tl.store(partial_max + c, m)
    tl.store(partial_sum + c, tl.reduce(scaled * scaled, 0, _sum_combine))


def sum_of_squares(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum(g.double().square().sum() for g in grads)`` as a 0-d float64 device tensor, one kernel launch.

    Elements are read once, as float32; each 4096-element chunk's sum is scaled by its largest
    magnitude, so nothing overflows (float64 holds the square of any float32 norm). Chunk partial sums
    are reduced by a fixed-order ``sum``, so the result is deterministic. Non-finite entries give NaN,
    which is how the caller detects them.
    """
    device = grads[0].device
    chunks = chunk_table([g.numel() for g in grads], device)
    ptrs, aligned = pointer_table([grads], device)
    partial_max = torch.empty(chunks.n_chunks, dtype=torch.float32, device=device)
    partial_sum = torch.empty(chunks.n_chunks, dtype=torch.float32, device=device)
    _sumsq_kernel.for_device(device)[(chunks.n_chunks,)](
        ptrs, chunks.numels, chunks.chunk_tensor, chunks.chunk_start, partial_max, partial_sum, grads[0],
        ALIGNED=aligned, BLOCK=chunks.block, num_warps=NUM_WARPS,
    )
    return (partial_max.double().square() * partial_sum.double()).sum()
