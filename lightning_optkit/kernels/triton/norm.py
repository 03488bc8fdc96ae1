"""Sum of squares over a list of tensors in one launch (the first half of a global-norm clip)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

# tl.sum is itself a @triton.jit function, fixed as compiled or interpreted when triton is imported, so
# an interpreted kernel cannot call it unless TRITON_INTERPRET was set before that import. tl.reduce is
# a builtin both modes handle, and the interpreter maps this (private) combine function to numpy's sum.
from triton.language.standard import _sum_combine

from lightning_optkit.kernels.triton.build import device_kernel
from lightning_optkit.kernels.triton.common import NUM_WARPS
from lightning_optkit.kernels.triton.tables import chunk_table, pointer_table


@device_kernel
def _sumsq_kernel(grad_ptrs, numels, chunk_tensor, chunk_start, partial, G_REF,
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
    tl.store(partial + c, tl.reduce(g * g, 0, _sum_combine))


def sum_of_squares(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum(g.float().square().sum() for g in grads)`` as a 0-d float32 device tensor, one kernel launch.

    Chunk partial sums are reduced by a fixed-order ``sum``, so the result is deterministic.
    Non-finite entries propagate (inf/nan), which is how the caller detects them.
    """
    device = grads[0].device
    chunks = chunk_table([g.numel() for g in grads], device)
    ptrs, aligned = pointer_table([grads], device)
    partial = torch.empty(chunks.n_chunks, dtype=torch.float32, device=device)
    _sumsq_kernel.for_device(device)[(chunks.n_chunks,)](
        ptrs, chunks.numels, chunks.chunk_tensor, chunks.chunk_start, partial, grads[0],
        ALIGNED=aligned, BLOCK=chunks.block, num_warps=NUM_WARPS,
    )
    return partial.sum()
