"""Codes for memory-lean optimizer state: blockwise int8 moments and seeded stochastic rounding to bf16.

int8 (both moments, one fp32 scale per block of ``BLOCK`` consecutive elements of a row):

* first moment ``m``: int8 ``q`` in [-127, 127], ``m = q * |q| * (s / 127**2)`` with ``s`` the block's
  largest ``|m|``. The code is square-root companded (``q = round(127 * sqrt(|m| / s))``): finer steps near
  zero than a linear code, largest relative error about ``1/|q|``.
* second moment ``v``: uint8 ``q`` in [0, 255] coding ``sqrt(v)`` (what the update divides by) the same
  way: ``sqrt(v) = q * q * (s / 255**2)`` with ``s`` the block's largest ``sqrt(v)``. So ``v`` itself is
  coded with a 4th-power law, covering ten decades below the block maximum.

Rounding is to nearest (half away from zero), on an fp32 value, with every constant an fp32 product, so
the torch path and the Triton kernels encode bit for bit alike. A block of zeros has scale 0 and codes 0.

Blocks never cross a row: a tensor of shape ``(R, ...)`` is viewed as ``(R, L)`` rows (``L`` = elements
per index of dim 0) and each row is split into blocks of ``BLOCK`` (the last one shorter when ``L`` is not
a multiple), so scales have shape ``(R, ceil(L / BLOCK))``. FSDP2 shards dim 0, so a rank's shard holds
whole rows, and the quantization of every element is the same on any number of processes.

Stochastic rounding (bf16 state, bf16 parameters): a lowbias32 hash of (element index, per-tensor key)
gives the noise, so the result depends only on the seed, the step count, the tensor and the element, and
the torch path reproduces the Triton kernel's bits. Computed in int32 with logical shifts by masking.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 256
M_LEVELS = 127.0
V_LEVELS = 255.0
M_UNIT = 1.0 / (M_LEVELS * M_LEVELS)  # rounded to fp32 where it is used (as a Python float times fp32)
V_UNIT = 1.0 / (V_LEVELS * V_LEVELS)
_HASH_A = 0x7FEB352D
_HASH_B = 0x846CA68B - (1 << 32)  # as int32 (the same bits as the uint32 constant)
_KEY_SEED = 0x9E3779B9
_KEY_STEP = 0x85EBCA6B
_KEY_SALT = 0xC2B2AE35
_MASK32 = (1 << 32) - 1


def rows(x: Tensor) -> Tensor:
    """``x`` as its ``(R, L)`` row view (dim 0 by everything else); ``x`` must be contiguous."""
    return x.view(x.shape[0], -1)


def n_blocks(row_length: int) -> int:
    """Blocks per row of ``row_length`` elements."""
    return -(-row_length // BLOCK)


def scale_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The shape of the scale tensor of a parameter of ``shape`` (ndim >= 2)."""
    length = 1
    for d in shape[1:]:
        length *= d
    return (shape[0], n_blocks(length))


def _pieces(x: Tensor) -> list[Tensor]:
    """The ``(R, L)`` tensor ``x`` as 3-D views ``(R, k, w)``: whole blocks, then the short last block."""
    length = x.shape[1]
    full = length // BLOCK
    out = []
    if full:
        out.append(x[:, : full * BLOCK].unflatten(1, (full, BLOCK)))
    if length % BLOCK:
        out.append(x[:, full * BLOCK:].unsqueeze(1))
    return out


def _scale_views(s: Tensor, length: int) -> list[Tensor]:
    """The scale columns ``(R, k)`` of the pieces of :func:`_pieces` for rows of ``length`` elements."""
    full = length // BLOCK
    out = []
    if full:
        out.append(s[:, :full])
    if length % BLOCK:
        out.append(s[:, full:])
    return out


def _decode(codes: Tensor, scale: Tensor, unit: float, out: Tensor, signed: bool) -> Tensor:
    units = scale * unit
    for q, u, o in zip(_pieces(codes), _scale_views(units, codes.shape[1]), _pieces(out)):
        qf = q.float()
        torch.mul(qf * (qf.abs() if signed else qf), u[..., None], out=o)
    return out


def decode_signed(codes: Tensor, scale: Tensor, out: Tensor) -> Tensor:
    """Write the first moment coded by int8 ``codes`` (R, L) with ``scale`` (R, nb) into fp32 ``out`` (R, L)."""
    return _decode(codes, scale, M_UNIT, out, True)


def decode_root(codes: Tensor, scale: Tensor, out: Tensor) -> Tensor:
    """Write ``sqrt(v)`` coded by uint8 ``codes`` (R, L) with ``scale`` (R, nb) into fp32 ``out`` (R, L)."""
    return _decode(codes, scale, V_UNIT, out, False)


def _encode(x: Tensor | None, magnitude: Tensor, levels: float, codes: Tensor, scale: Tensor) -> None:
    """Shared encoder: ``magnitude`` = |x| (R, L); signed codes (the sign of ``x``) when ``x`` is given.

    ``magnitude / s`` is at most 1 (``s`` is the block's largest magnitude; a zero block divides by 1), so
    no clamp; dividing (not multiplying by ``1 / s``) keeps blocks of subnormal values finite.
    """
    length = magnitude.shape[1]
    signs = _pieces(x) if x is not None else [None] * len(_pieces(magnitude))
    for mag, sign, c, sv in zip(_pieces(magnitude), signs, _pieces(codes), _scale_views(scale, length)):
        s = mag.amax(dim=2)  # (R, k)
        divisor = torch.where(s > 0, s, torch.ones_like(s))
        u = (mag / divisor[..., None]).sqrt_().mul_(levels).add_(0.5)
        if sign is not None:
            u = torch.copysign(u, sign)
        c.copy_(u)  # float -> int8/uint8 truncates toward zero: round half away from zero
        sv.copy_(s)


def encode_signed(m: Tensor, codes: Tensor, scale: Tensor) -> None:
    """Quantize fp32 ``m`` (R, L) into int8 ``codes`` (R, L) and fp32 ``scale`` (R, nb), in place."""
    _encode(m, m.abs(), M_LEVELS, codes, scale)


def encode_root(root: Tensor, codes: Tensor, scale: Tensor) -> None:
    """Quantize fp32 ``root`` = sqrt(v) >= 0 (R, L) into uint8 ``codes`` and fp32 ``scale``, in place."""
    _encode(None, root, V_LEVELS, codes, scale)


# ----------------------------------------------------------------------------------- stochastic rounding
def tensor_key(seed: int, step: Tensor, salt: int, offset: int = 0) -> Tensor:
    """The per-tensor hash key (0-d int64 device tensor in [0, 2**32)) of this step: no host sync.

    ``offset``: the flat index of a shard's first element in the whole tensor. The hash adds the key to
    the local element index, so a shard keyed with its offset draws the noise of the same elements of the
    unsharded tensor: stochastic rounding does not depend on the number of processes.
    """
    base = (seed * _KEY_SEED + salt * _KEY_SALT + offset) & _MASK32
    return (step.to(torch.int64) * _KEY_STEP + base) & _MASK32


def _shr(h: Tensor, k: int) -> Tensor:
    """Logical right shift of int32 ``h`` (arithmetic shift, then the sign-extended bits masked off)."""
    return (h >> k) & ((1 << (32 - k)) - 1)


def hash_noise(start: int, count: int, key: Tensor, device: torch.device) -> Tensor:
    """lowbias32(element index + key) for elements ``start .. start + count`` as int32 (uint32 bits)."""
    k32 = torch.where(key >= 2**31, key - 2**32, key).to(torch.int32)
    h = torch.arange(start, start + count, dtype=torch.int32, device=device) + k32
    h ^= _shr(h, 16)
    h *= _HASH_A
    h ^= _shr(h, 15)
    h *= _HASH_B
    h ^= _shr(h, 16)
    return h


def to_bf16_stochastic(x: Tensor, noise16: Tensor, out: Tensor) -> None:
    """Write fp32 ``x`` into bf16 ``out`` with stochastic rounding by 16-bit ``noise16`` (int32, 0..65535).

    Adds the noise below the 16 kept bits and truncates, so ``E[out] = x``. Infinities stay infinite;
    NaN stays NaN (torch's quiet NaN has its payload in the kept bits).
    """
    bits = x.view(torch.int32) + noise16
    out.view(torch.int16).copy_(bits >> 16)  # int32 -> int16 keeps the low 16 bits of the shifted value
