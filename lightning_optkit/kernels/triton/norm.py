"""Sum of squares over a list of tensors in one launch (the first half of a global-norm clip)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from lightning_optkit.kernels.triton.build import device_kernel
from lightning_optkit.kernels.triton.common import NUM_WARPS
from lightning_optkit.kernels.triton.tables import chunk_table, pointer_table


@device_kernel
def _sumsq_kernel(grad_ptrs, numels, chunk_tensor, chunk_start, partial, G_REF, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(G_REF.dtype.element_ty))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial + c, tl.sum(g * g, axis=0))


def sum_of_squares(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum(g.float().square().sum() for g in grads)`` as a 0-d float32 device tensor, one kernel launch.

    Chunk partial sums are reduced by a fixed-order ``sum``, so the result is deterministic.
    Non-finite entries propagate (inf/nan), which is how the caller detects them.
    """
    device = grads[0].device
    chunks = chunk_table([g.numel() for g in grads], device)
    ptrs = pointer_table([grads], device)
    partial = torch.empty(chunks.n_chunks, dtype=torch.float32, device=device)
    _sumsq_kernel.for_device(device)[(chunks.n_chunks,)](
        ptrs, chunks.numels, chunks.chunk_tensor, chunks.chunk_start, partial, grads[0],
        BLOCK=chunks.block, num_warps=NUM_WARPS,
    )
    return partial.sum()
