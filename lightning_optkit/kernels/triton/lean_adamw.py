"""AdamW over lean state (bf16 or blockwise int8 moments) as one Triton launch per tensor group.

The same algorithm as :mod:`lightning_optkit.kernels.lean_adamw` (the torch path), in one pass per
element: load the codes, decode with the block's scale, update in fp32, encode against the new block
maximum (a row reduction inside the program) and store codes, scales and the parameter. A program owns
``TILE_BLOCKS`` consecutive 256-element blocks of one row (see :mod:`lightning_optkit.kernels.lean_codec`:
blocks never cross a row), so every block's maximum is known without another pass.

bf16 moments and bf16 parameters are rounded stochastically with the torch path's hash of (element
index, per-tensor key), so both paths draw the same noise. No host sync: lr, bias corrections, clip
coefficient, skip flag and keys are device tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

# tl.max is a @triton.jit function fixed at triton's import; tl.reduce with this combine function runs in
# both modes (see lightning_optkit.kernels.triton.norm).
from triton.language.standard import _elementwise_max

from lightning_optkit.kernels import lean_codec as codec
from lightning_optkit.kernels.triton.build import device_function, device_kernel
from lightning_optkit.kernels.triton.chunks import bf16_nearest, scaled_grad, tensor_pointer
from lightning_optkit.kernels.triton.common import NUM_WARPS, device_scalar, optional_scalar
from lightning_optkit.kernels.triton.tables import _LRU, pointer_table

TILE_BLOCKS = 8  # 256-element blocks per program: 2048 elements
_TILES = _LRU(32)


@device_function
def _lowbias32(h):
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@device_function
def _bf16_with_noise(x, noise):
    """fp32 -> bf16 by adding 16-bit ``noise`` below the kept bits and truncating (the torch path's rule)."""
    bits = x.to(tl.uint32, bitcast=True) + noise
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@device_function
def _encode(x, levels, SIGNED: tl.constexpr):
    """(codes as float, block maxima) of a [blocks, 256] tile: round(levels * sqrt(|x| / max))."""
    mag = tl.abs(x)
    s = tl.reduce(mag, 1, _elementwise_max)
    divisor = tl.where(s > 0.0, s, 1.0)
    u = (tl.sqrt(mag / divisor[:, None]) * levels + 0.5).to(tl.int32)  # truncation: half away from zero
    if SIGNED:
        u = tl.where(x < 0.0, -u, u)
    return u, s


@device_kernel
def _lean_adamw_kernel(
    ptrs, grad_ptrs, prog_tensor, prog_start, prog_end, prog_scale, n_tensors,
    step_size_ptr, bc2_sqrt_ptr, decay_ptr, mult_ptr, skip_ptr, mkey_ptr, pkey_ptr,
    beta1, beta2, eps, m_unit, v_unit,
    P_REF, M_REF, V_REF, S_REF,
    INT8: tl.constexpr, HAS_MULT: tl.constexpr, HAS_SKIP: tl.constexpr, MAXIMIZE: tl.constexpr,
    BF16_PARAMS: tl.constexpr, STOCHASTIC_PARAMS: tl.constexpr, ALIGNED: tl.constexpr, NB: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(prog_tensor + c)
    start = tl.load(prog_start + c)
    end = tl.load(prog_end + c)
    if ALIGNED:  # host-checked: 16-byte aligned pointers and rows of a multiple of 16 elements
        start = tl.multiple_of(start, 16)
    if HAS_SKIP:
        end = tl.where(tl.load(skip_ptr) == 0.0, end, start)  # skipped: every element masked off
    p_ptr = tensor_pointer(ptrs, t, P_REF, ALIGNED)
    m_ptr = tensor_pointer(ptrs + n_tensors, t, M_REF, ALIGNED)
    v_ptr = tensor_pointer(ptrs + 2 * n_tensors, t, V_REF, ALIGNED)
    g_ptr = tensor_pointer(grad_ptrs, t, P_REF, ALIGNED)
    block_first = start + tl.arange(0, NB) * 256
    offs = block_first[:, None] + tl.arange(0, 256)[None, :]
    mask = offs < end
    block_mask = block_first < end

    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = scaled_grad(tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32), mult_ptr, HAS_MULT, MAXIMIZE)
    if INT8:
        ms_ptr = tensor_pointer(ptrs + 3 * n_tensors, t, S_REF, ALIGNED)
        vs_ptr = tensor_pointer(ptrs + 4 * n_tensors, t, S_REF, ALIGNED)
        scale_offs = tl.load(prog_scale + c) + tl.arange(0, NB)
        ms = tl.load(ms_ptr + scale_offs, mask=block_mask, other=0.0)
        vs = tl.load(vs_ptr + scale_offs, mask=block_mask, other=0.0)
        qm = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.float32)
        qv = tl.load(v_ptr + offs, mask=mask, other=0).to(tl.float32)
        m = qm * tl.abs(qm) * (ms * m_unit)[:, None]
        root = qv * qv * (vs * v_unit)[:, None]
        v = root * root
    else:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    root = tl.sqrt(v)
    denom = root / tl.load(bc2_sqrt_ptr + t) + eps
    p = p * tl.load(decay_ptr) - (m / denom) * tl.load(step_size_ptr + t)

    if BF16_PARAMS:
        if STOCHASTIC_PARAMS:
            noise = _lowbias32(offs.to(tl.uint32) + tl.load(pkey_ptr + t).to(tl.uint32)) & 0xFFFF
            p = _bf16_with_noise(p, noise)
        else:
            p = bf16_nearest(p)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    if INT8:
        qm, ms = _encode(m, 127.0, True)
        qv, vs = _encode(root, 255.0, False)
        tl.store(m_ptr + offs, qm.to(tl.int8), mask=mask)
        tl.store(v_ptr + offs, qv.to(tl.uint8), mask=mask)
        tl.store(ms_ptr + scale_offs, ms, mask=block_mask)
        tl.store(vs_ptr + scale_offs, vs, mask=block_mask)
    else:
        h = _lowbias32(offs.to(tl.uint32) + tl.load(mkey_ptr + t).to(tl.uint32))
        tl.store(m_ptr + offs, _bf16_with_noise(m, h & 0xFFFF), mask=mask)
        tl.store(v_ptr + offs, _bf16_with_noise(v, h >> 16), mask=mask)


def _host_to(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on ``device``: pinned and asynchronous (no host sync) off the CPU."""
    return host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)


def _tiles(shapes: Sequence[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(tensor, first element, row end, first scale index) of every program, for ``(rows, length)`` shapes."""
    key = (tuple(shapes), str(device))
    cached = _TILES.get(key)
    if cached is None:
        width = TILE_BLOCKS * codec.BLOCK
        parts = []
        for i, (rows, length) in enumerate(shapes):
            tiles = -(-length // width)
            r = torch.arange(rows).repeat_interleave(tiles)
            k = torch.arange(tiles).repeat(rows)
            parts.append((torch.full_like(r, i), r * length + k * width, r * length + length,
                          r * codec.n_blocks(length) + k * TILE_BLOCKS))
        cols = [torch.cat(col) for col in zip(*parts)]
        cached = tuple(_host_to(col.to(torch.int32 if j == 0 else torch.int64), device) for j, col in enumerate(cols))
        _TILES.put(key, cached)
    return cached  # type: ignore[return-value]


def triton_lean_adamw(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict[str, torch.Tensor]],
    steps_size: torch.Tensor, bc2_sqrt: torch.Tensor, decay: torch.Tensor, *, beta1: float, beta2: float,
    eps: float, maximize: bool, grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
    moment_keys: torch.Tensor, param_keys: torch.Tensor | None,
) -> None:
    """One launch over contiguous tensors of one device, param dtype and state layout (all int8 or all bf16).

    ``steps_size``/``bc2_sqrt`` are per-tensor fp32 device vectors, ``decay`` the 0-d ``1 - lr * wd``;
    ``moment_keys``/``param_keys`` int64 per-tensor hash keys (``param_keys`` None: no stochastic
    rounding of bf16 params). Step counters are advanced by the caller.
    """
    device = params[0].device
    int8 = "exp_avg_scale" in states[0]
    rows = [params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]]
    if int8:
        rows += [[s["exp_avg_scale"] for s in states], [s["exp_avg_sq_scale"] for s in states]]
    ptrs, aligned = pointer_table(rows, device)
    grad_ptrs, grads_aligned = pointer_table([grads], device)
    prog_tensor, prog_start, prog_end, prog_scale = _tiles(
        [(p.shape[0], p.numel() // max(p.shape[0], 1)) for p in params], device)
    if prog_tensor.numel() == 0:
        return
    mult, has_mult = optional_scalar(grad_scale, device, decay)
    skip_t, has_skip = optional_scalar(skip, device, decay)
    bf16_params = params[0].dtype == torch.bfloat16
    _lean_adamw_kernel.for_device(device)[(prog_tensor.numel(),)](
        ptrs, grad_ptrs, prog_tensor, prog_start, prog_end, prog_scale, len(params),
        steps_size, bc2_sqrt, device_scalar(decay, device), mult, skip_t, moment_keys,
        param_keys if param_keys is not None else moment_keys,
        beta1, beta2, eps, codec.M_UNIT, codec.V_UNIT,
        params[0], states[0]["exp_avg"], states[0]["exp_avg_sq"], steps_size,
        INT8=int8, HAS_MULT=has_mult, HAS_SKIP=has_skip, MAXIMIZE=maximize, BF16_PARAMS=bf16_params,
        STOCHASTIC_PARAMS=param_keys is not None and bf16_params,
        ALIGNED=aligned and grads_aligned and all((p.numel() // max(p.shape[0], 1)) % 16 == 0 for p in params),
        NB=TILE_BLOCKS, num_warps=NUM_WARPS,
    )
