"""Device-side helpers shared by the multi-tensor kernels: chunk addressing, loads/stores, bf16 rounding.

A kernel program updates one chunk of one tensor (see :mod:`lightning_optkit.kernels.triton.tables`).
These helpers are :func:`~lightning_optkit.kernels.triton.build.device_function` s, so each is built in
the calling kernel's mode (compiled or interpreted); the compiler inlines them, which keeps the alignment
hints they attach (on values they compute themselves, never on their arguments, whose attributes would
not survive inlining) and so the 16-byte vector accesses.

Each :func:`load_f32` / :func:`store` branches on ``full``; a kernel issues its loads back to back (and its
stores likewise) so the compiler merges those branches into one, as a hand-written ``if full:`` would be.
Verified against the hand-inlined kernels: the same PTX instructions for every constexpr combination.
"""

from __future__ import annotations

import triton.language as tl

from lightning_optkit.kernels.triton.build import device_function


@device_function
def program_chunk(chunk_tensor, chunk_start, numels, skip_ptr,
                  HAS_SKIP: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """``(t, start, n)`` of this program: its tensor's index, the chunk's first element, and the tensor's
    element count (0 when the skip flag is set, which masks every element off)."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    if HAS_SKIP:
        n = tl.where(tl.load(skip_ptr) == 0.0, n, 0)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)
    return t, start, n


@device_function
def chunk_offsets(start, n, BLOCK: tl.constexpr):
    """``(offs, mask, full)``: the chunk's element offsets, their in-bounds mask, and whether the whole
    chunk is in bounds (then accesses go unmasked, so they can be vectorised)."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < n, start + BLOCK <= n


@device_function
def tensor_pointer(table, t, REF, ALIGNED: tl.constexpr):
    """Tensor ``t``'s data pointer from an int64 pointer-table row, typed like ``REF``'s elements.

    ``ALIGNED`` (checked on the host) marks it 16-byte aligned: pointers loaded from a table carry no
    alignment facts, and without this the compiler cannot emit vector accesses.
    """
    ptr = tl.load(table + t).to(tl.pointer_type(REF.dtype.element_ty))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@device_function
def load_f32(ptr, offs, mask, full):
    """Elements ``offs`` of ``ptr`` as float32; unmasked when ``full``, else masked (0 outside)."""
    if full:
        x = tl.load(ptr + offs).to(tl.float32)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@device_function
def store(ptr, offs, x, mask, full):
    """Store ``x`` (cast to ``ptr``'s element type) at elements ``offs``; unmasked when ``full``."""
    x = x.to(ptr.dtype.element_ty)
    if full:
        tl.store(ptr + offs, x)
    else:
        tl.store(ptr + offs, x, mask=mask)


@device_function
def scaled_grad(g, mult_ptr, HAS_MULT: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The gradient the update uses: times the device-scalar multiplier (clipping), negated to maximize."""
    if HAS_MULT:
        g = g * tl.load(mult_ptr)
    if MAXIMIZE:
        g = -g
    return g


@device_function
def bf16_nearest(x):
    """float32 -> bfloat16, round to nearest even by integer arithmetic: exact on GPU and in the interpreter
    (whose fp32 -> bf16 cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@device_function
def bf16_stochastic(x, seed_ptr, BLOCK: tl.constexpr):
    """float32 -> bfloat16 with stochastic rounding, so ``E[bf16(x)] = x``; inf/nan round to nearest.

    Uniform 16-bit noise is added below the kept bits, then truncated. The noise is a lowbias32 hash of
    (element, step seed): plain integer ops, since ``tl.randint`` cannot run in an interpreted kernel built
    after triton's import.
    """
    bits = x.to(tl.uint32, bitcast=True)
    nearest = bits + 0x7FFF + ((bits >> 16) & 1)
    h = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.uint32) + tl.load(seed_ptr).to(tl.uint32) * 0x9E3779B9
    h = (h ^ (h >> 16)) * 0x7FEB352D
    h = (h ^ (h >> 15)) * 0x846CA68B
    h = h ^ (h >> 16)
    finite = (bits & 0x7F800000) != 0x7F800000
    bits = tl.where(finite, bits + (h & 0xFFFF), nearest) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
