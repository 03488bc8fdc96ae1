"""The lean-state codes: int8 blockwise round-trip bounds and the stochastic-rounding hash and rounding.

Fresh random data every run (the ``gen`` fixture prints its seed), with outliers, zero blocks, tiny and
huge magnitudes and rows that are not a multiple of the block.
"""

from __future__ import annotations

import pytest
import torch

from lightning_optkit.kernels import lean_codec as codec

SHAPES = [(6, 768), (5, 300), (7, 100), (3, 256), (2, 1000)]  # whole blocks, short last blocks, one block


def _data(shape, gen, low: int = -30, high: int = 30) -> torch.Tensor:
    """Rows of mixed magnitudes: per-block scales from 1e``low`` to 1e``high``, outliers, one zero block."""
    x = torch.randn(shape, generator=gen)
    rows, length = shape
    for r in range(rows):
        for b in range(codec.n_blocks(length)):
            lo, hi = b * codec.BLOCK, min(length, (b + 1) * codec.BLOCK)
            exponent = float(torch.randint(low, high + 1, (), generator=gen))
            x[r, lo:hi] *= 10.0 ** exponent
            if hi - lo > 3:
                x[r, lo + int(torch.randint(0, hi - lo, (), generator=gen))] *= 1e4  # an outlier
    x[0, : min(length, codec.BLOCK)] = 0.0  # a zero block
    return x


def _block_max(x: torch.Tensor) -> torch.Tensor:
    """Each element's block maximum of |x| (float64), computed block by block."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for b in range(codec.n_blocks(x.shape[1])):
        sl = slice(b * codec.BLOCK, (b + 1) * codec.BLOCK)
        out[:, sl] = x[:, sl].abs().double().amax(dim=1, keepdim=True)
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_signed_code_round_trip_within_half_a_code_step(shape, gen):
    m = _data(shape, gen)
    codes = torch.empty(shape, dtype=torch.int8)
    scale = torch.empty(codec.scale_shape(shape))
    codec.encode_signed(m, codes, scale)
    back = codec.decode_signed(codes, scale, torch.empty(shape))
    s = _block_max(m)
    # the scale is the block's largest |m|, exactly
    assert torch.equal(scale.double(), s[:, :: codec.BLOCK][:, : scale.shape[1]])
    u = 127.0 * (m.double().abs() / s.clamp_min(1e-300)).sqrt()  # the exact code-space value
    # |m - m^| = s/127^2 * |u^2 - q^2| <= s/127^2 * 0.5 * (2u + 0.5), plus fp32 rounding (1e-6 of s)
    bound = s / 127**2 * 0.5001 * (2 * u + 0.5001) + 1e-6 * s
    err = (back.double() - m.double()).abs()
    assert (err <= bound).all(), (err / bound.clamp_min(1e-300)).max()
    assert codes.abs().max() <= 127 and (codes.sign() * m.sign() >= 0).all()
    assert torch.equal(back[0, : min(shape[1], codec.BLOCK)], torch.zeros(min(shape[1], codec.BLOCK)))
    # every block's largest element comes back to 1e-6, and the bound is not vacuous: errors reach it
    assert (err / bound.clamp_min(1e-300)).max() > 0.2


@pytest.mark.parametrize("shape", SHAPES)
def test_root_code_round_trip_within_half_a_code_step(shape, gen):
    # sqrt of a second moment: v from 1e-40 to 1e36 (sqrt(v) of an fp32 v stays below 1.9e19)
    root = _data(shape, gen, low=-20, high=14).abs()
    codes = torch.empty(shape, dtype=torch.uint8)
    scale = torch.empty(codec.scale_shape(shape))
    codec.encode_root(root, codes, scale)
    back = codec.decode_root(codes, scale, torch.empty(shape))
    s = _block_max(root)
    u = 255.0 * (root.double() / s.clamp_min(1e-300)).sqrt()
    bound = s / 255**2 * 0.5001 * (2 * u + 0.5001) + 1e-6 * s
    err = (back.double() - root.double()).abs()
    assert (err <= bound).all(), (err / bound.clamp_min(1e-300)).max()
    assert (err / bound.clamp_min(1e-300)).max() > 0.2
    # relative error of sqrt(v) is at most about 1/u: 4% from 1% of the block maximum up, 0.8% from 25% up
    rel = err / root.double().clamp_min(1e-300)
    assert (rel[root.double() >= 0.01 * s] <= 0.0400).all()
    assert (rel[root.double() >= 0.25 * s] <= 0.0080).all()


def test_subnormal_and_zero_blocks_stay_finite(gen):
    m = torch.zeros(2, 512)
    m[0, :256] = torch.randn(256, generator=gen) * 1e-39  # subnormal float32 values
    codes = torch.empty(m.shape, dtype=torch.int8)
    scale = torch.empty(codec.scale_shape(m.shape))
    codec.encode_signed(m, codes, scale)
    back = codec.decode_signed(codes, scale, torch.empty(m.shape))
    assert torch.isfinite(back).all() and torch.equal(back[1], torch.zeros(512))
    assert (codes[0, :256] != 0).sum() > 200


def _lowbias32(x: int) -> int:
    mask = 0xFFFFFFFF
    x &= mask
    x ^= x >> 16
    x = (x * 0x7FEB352D) & mask
    x ^= x >> 15
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def test_hash_noise_matches_the_uint32_reference(gen):
    key = torch.randint(0, 2**32, (), generator=gen, dtype=torch.int64)
    start = int(torch.randint(0, 2**20, (), generator=gen))
    h = codec.hash_noise(start, 4096, key, torch.device("cpu"))
    expected = [_lowbias32(start + i + int(key)) for i in range(4096)]
    assert [v & 0xFFFFFFFF for v in h.tolist()] == expected


def test_stochastic_rounding_is_unbiased_and_stays_between_neighbours(gen):
    x = (torch.rand(1 << 16, generator=gen) * 2 - 1) * 10.0 ** float(torch.randint(-20, 20, (), generator=gen))
    key = torch.randint(0, 2**32, (), generator=gen, dtype=torch.int64)
    noise = codec.hash_noise(0, x.numel(), key, x.device) & 0xFFFF
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    codec.to_bf16_stochastic(x, noise, out)
    down = (x.view(torch.int32) >> 16 << 16).view(torch.float32)  # truncation: toward zero
    up_bits = (x.view(torch.int32) >> 16) + 1
    up = (up_bits << 16).view(torch.float32)
    y = out.float()
    exact = down == x
    assert ((y == down) | ((y == up) & ~exact)).all()
    # E[y] = x: the mean rounding error is within 5 standard errors of zero
    err = (y.double() - x.double()) / (up.double() - down.double()).abs()
    assert abs(err.mean().item()) < 5 * err.std().item() / err.numel() ** 0.5
    for special in (float("inf"), float("-inf")):
        t = torch.full((4,), special)
        codec.to_bf16_stochastic(t, torch.full((4,), 0xFFFF, dtype=torch.int32), out[:4])
        assert torch.equal(out[:4].float(), t)
