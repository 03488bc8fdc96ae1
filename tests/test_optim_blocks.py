"""Cache-sized blocks (lightning_optkit/optim/blocks.py): the cut covers every element once, and a rule run
block by block gives the whole-list rule's bits, with and without a deferred grad scale and skip flag."""

from __future__ import annotations

import pytest
import torch

from lightning_optkit.optim import LAMB, Adan, Lion, ScheduleFreeAdamW
from lightning_optkit.optim.blocks import Scratch, split_blocks


def test_split_blocks_covers_every_element_once_in_order():
    a = torch.arange(10.0)
    b = torch.arange(100.0, 107.0).reshape(7, 1)
    c = torch.arange(200.0, 230.0).reshape(5, 6).t()  # not contiguous: stays whole
    d = torch.arange(300.0, 303.0)
    e = torch.tensor([400.0])
    lists = [[a, b, c, d, e], [a * 2, b * 2, (c * 2), d * 2, e * 2]]
    blocks = split_blocks(lists, block_numel=4)
    seen: dict[int, list[torch.Tensor]] = {}
    for owners, views in blocks:
        assert len(views) == 2 and all(len(v) == len(owners) for v in views)
        assert sum(v.numel() for v in views[0]) <= 4 or len(owners) == 1  # a whole tensor may exceed a block
        for owner, first, second in zip(owners, *views):
            torch.testing.assert_close(second, first * 2, rtol=0, atol=0)  # aligned pieces
            seen.setdefault(owner, []).append(first.reshape(-1))
    for i, tensor in enumerate([a, b, c, d, e]):
        assert torch.equal(torch.cat(seen[i]), tensor.reshape(-1)), i
    assert any(len(owners) > 1 for owners, _ in blocks)  # small pieces are packed together


def test_split_blocks_views_write_through():
    t = torch.zeros(11)
    for _, (views,) in split_blocks([[t]], block_numel=3):
        torch._foreach_add_(views, 1.0)
    assert torch.equal(t, torch.ones(11))


def test_scratch_is_reused_and_shaped_like_the_piece():
    scratch = Scratch(block_numel=16)
    piece = torch.randn(3, 4)
    first = scratch.take([piece], 2)
    assert [t.shape for t in first] == [piece.shape] * 2
    assert first[0].data_ptr() != first[1].data_ptr()
    again = scratch.take([torch.randn(12)], 2)
    assert again[0].data_ptr() == first[0].data_ptr()  # the same buffer: no allocation per block
    assert scratch.take([piece, piece], 2) == [None, None]  # several pieces: the rule allocates
    assert scratch.take([torch.randn(17)], 1) == [None]  # larger than a block


CASES = [
    (Adan, dict(lr=1e-2, weight_decay=0.02)),
    (Adan, dict(lr=1e-2, weight_decay=0.02, no_prox=True)),
    (ScheduleFreeAdamW, dict(lr=1e-2, weight_decay=0.01, warmup_steps=3, r=0.5)),
    (Lion, dict(lr=1e-2, weight_decay=0.1)),
    (LAMB, dict(lr=1e-2)),
]
IDS = ["adan", "adan_no_prox", "schedulefree", "lion", "lamb"]


def train(cls, kwargs, block_numel, dtype, gen_seed, foreach=True):
    small = type(cls.__name__, (cls,), {"block_numel": block_numel})
    gen = torch.Generator().manual_seed(gen_seed)
    shapes = [(40, 30), (7,), (5, 3), (1000,), (9, 64)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(30, 20, generator=gen, dtype=dtype).t()))  # not contiguous
    optimizer = small(params, foreach=foreach, **kwargs)
    for step in range(7):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        if step >= 3:  # guarded steps: a clip coefficient and a skip flag (step 5 skipped, with a NaN grad)
            defer_guard(optimizer, params, dtype, skipped=step == 5)
        optimizer.step()
    return params, optimizer


def defer_guard(optimizer, params, dtype, *, skipped: bool) -> None:
    """A clip coefficient and a skip flag, as the guard callbacks defer them; a skipped step gets a NaN grad."""
    optimizer.defer_grad_scale(torch.tensor(0.37, dtype=dtype))
    optimizer.defer_skip(torch.tensor(skipped))
    if skipped:
        params[0].grad[0, 0] = float("nan")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=IDS)
def test_blocked_rule_gives_the_whole_list_bits(cls, kwargs, dtype):
    """Blocks of 64 elements (every tensor cut, small ones packed) against one block of everything."""
    blocked, opt_blocked = train(cls, kwargs, 64, dtype, 3)
    whole, opt_whole = train(cls, kwargs, 1 << 40, dtype, 3)
    for a, b in zip(blocked, whole):
        if cls is LAMB:  # per-tensor norms of cut tensors are summed from their pieces: roundoff apart
            rel = 1e-6 if dtype == torch.float32 else 1e-14
            assert (a - b).abs().max() <= rel * b.abs().max()
        else:
            assert torch.equal(a, b)
            for key, value in opt_blocked.state[a].items():
                assert torch.equal(value, opt_whole.state[b][key]), key


@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=IDS)
def test_skipped_step_on_cut_tensors_leaves_every_bit(cls, kwargs):
    gen = torch.Generator().manual_seed(5)
    small = type(cls.__name__, (cls,), {"block_numel": 50})
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(20, 15), (9,), (301,)]]
    optimizer = small(params, **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    with torch.no_grad():
        params[0][3, 4] = -0.0
        params[2][7] = float("nan")
    bits = [p.detach().view(torch.int32).clone() for p in params]
    state = {i: {k: v.clone() for k, v in optimizer.state[p].items()} for i, p in enumerate(params)}
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[1].grad[2] = float("inf")
    optimizer.defer_skip(torch.tensor(True))
    optimizer.step()
    for p, b in zip(params, bits):
        assert torch.equal(p.detach().view(torch.int32), b)
    for i, p in enumerate(params):
        for key, value in state[i].items():
            torch.testing.assert_close(optimizer.state[p][key], value, rtol=0, atol=0, equal_nan=True)
