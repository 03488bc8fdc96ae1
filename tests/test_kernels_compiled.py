"""Compiled rules (lightning_optkit/kernels/compiled.py): one fused pass per tensor gives the eager rule's results
(Lion bit for bit; Adan, ScheduleFreeAdamW and LAMB to the roundoff of eager torch's not correctly rounded
sqrt), the same bits run to run, a skipped step leaves every bit, and the switches turn it off."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_optim_blocks import CASES, IDS, defer_guard  # the same configurations as the blocked-rule tests

from lightning_optkit.kernels import compiled, lamb_native
from lightning_optkit.optim import Adan, Lion

SHAPES = [(40, 30), (7,), (1001,), (9, 64)]  # with MIN_NUMEL = 1000: two compiled, two eager


@pytest.fixture(autouse=True)
def _small_threshold(monkeypatch):
    monkeypatch.setattr(compiled, "MIN_NUMEL", 1000)
    monkeypatch.setattr(compiled, "CHUNK", 2)  # one chunk of both large tensors: small graphs, quick compiles
    monkeypatch.delenv(compiled.ENV, raising=False)
    monkeypatch.setenv(lamb_native.ENV, "0")  # LAMB's native kernel would take the tensors the compiled rule gets


def train(cls, kwargs, dtype, gen, on=True, steps=6):
    start = [torch.randn(s, generator=gen, dtype=dtype) * 0.1 for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(steps)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = cls(params, **kwargs)
    optimizer.compile_rules = on
    for step, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        if step >= 3:  # guarded steps: a clip coefficient and a skip flag (step 4 skipped, with a NaN grad)
            defer_guard(optimizer, params, dtype, skipped=step == 4)
        optimizer.step()
    return params, optimizer


@pytest.fixture
def compiled_counts(monkeypatch):
    """How many tensors each step handed to a compiled rule (the tests must not pass on the eager path)."""
    counts: list[int] = []
    partition = compiled.partition

    def spy(owner, lists):
        fast, rest = partition(owner, lists)
        counts.append(len(fast))
        return fast, rest

    monkeypatch.setattr(compiled, "partition", spy)
    return counts


@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=IDS)
def test_compiled_rule_gives_the_eager_rules_results(cls, kwargs, gen, compiled_counts):
    dtypes = [torch.float32, torch.float64] if cls in (Adan, Lion) else [torch.float32]
    for dtype in dtypes:
        seed = int(torch.randint(0, 2**31, (), generator=gen))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed compile would fall back silently
            ours, opt = train(cls, kwargs, dtype, torch.Generator().manual_seed(seed))
            again, _ = train(cls, kwargs, dtype, torch.Generator().manual_seed(seed))
        eager, opt_eager = train(cls, kwargs, dtype, torch.Generator().manual_seed(seed), on=False)
        assert compiled_counts and set(compiled_counts) == {2, 0}  # two tensors compiled; none with it off
        rel = 1e-6 if dtype == torch.float32 else 1e-14  # eager sqrt is within 1 ulp of the correctly rounded one
        for a, b, c in zip(ours, again, eager):
            assert a.dtype == dtype and torch.equal(a, b)  # run to run: the same bits
            tensors = [(a, c)] + [(opt.state[a][k], opt_eager.state[c][k]) for k in opt_eager.state[c]]
            for x, y in tensors:
                assert x.dtype == y.dtype
                if cls is Lion:
                    assert torch.equal(x, y)  # the same ops, the same FMAs: bit for bit
                else:
                    assert (x.double() - y.double()).abs().max() <= rel * y.double().abs().max()
        assert not torch.equal(ours[0], train(cls, kwargs, dtype, torch.Generator().manual_seed(seed + 1))[0][0])


@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=IDS)
def test_compiled_skipped_step_leaves_every_bit(cls, kwargs, gen, compiled_counts):
    params, optimizer = train(cls, kwargs, torch.float32, gen, steps=2)
    with torch.no_grad():
        params[0][3, 4] = -0.0
        params[2][7] = float("nan")
    bits = [p.detach().view(torch.int32).clone() for p in params]
    state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    grads[2][5] = float("inf")
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.defer_grad_scale(torch.tensor(0.5))
    optimizer.defer_skip(torch.tensor(True))
    optimizer.step()
    assert compiled_counts[-1] == 2
    for p, b in zip(params, bits):
        assert torch.equal(p.detach().view(torch.int32), b)
        for key, value in state[p].items():
            torch.testing.assert_close(optimizer.state[p][key], value, rtol=0, atol=0, equal_nan=True)
    # the grad scale is applied as on the eager path: p.grad holds the scaled gradient afterwards
    torch.testing.assert_close(params[2].grad, grads[2] * 0.5, rtol=0, atol=0, equal_nan=True)


def test_partition_takes_large_contiguous_cpu_float_tensors_only(monkeypatch):
    big, small = torch.zeros(1200), torch.zeros(10)
    lists = {"param": [big, small, big.to(torch.bfloat16), torch.zeros(30, 40).t(), big],
             "grad": [big, small, big.to(torch.bfloat16), torch.zeros(30, 40).t(), big.to(torch.float64)]}
    assert compiled.partition(None, lists) == ([0], [1, 2, 3, 4])

    class Owner:
        compile_rules = False

    assert compiled.partition(Owner(), lists) == ([], [0, 1, 2, 3, 4])
    monkeypatch.setenv(compiled.ENV, "0")
    assert compiled.partition(None, lists) == ([], [0, 1, 2, 3, 4])
