"""The native LAMB kernel (kernels/lamb_native.c): the eager rule's results (the moments bit for bit, the
parameters to the roundoff of eager sqrt and of the norms), the same bits run to run and for any thread count,
a skipped step leaves every bit, and the switches and a missing compiler fall back to the other rules."""

from __future__ import annotations

import logging

import pytest
import torch
from test_optim_blocks import defer_guard

from lightning_optkit.kernels import compiled, lamb_native
from lightning_optkit.optim import LAMB

# With MIN_NUMEL = 1000: four tensors for the kernel (a 1024-element chunk and a tail; lengths not a multiple of
# its 8 lanes), two for the eager rule.
SHAPES = [(40, 30), (7,), (1001,), (9, 64), (3000,), (17, 101)]
NATIVE = [0, 2, 4, 5]

pytestmark = pytest.mark.skipif(lamb_native.library() is None, reason="no C compiler for the native kernel")


@pytest.fixture(autouse=True)
def _small_threshold(monkeypatch):
    monkeypatch.setattr(compiled, "MIN_NUMEL", 1000)
    monkeypatch.delenv(lamb_native.ENV, raising=False)


@pytest.fixture
def native_calls(monkeypatch):
    """The number of tensors each native call took."""
    counts: list[int] = []
    step = lamb_native.step

    def spy(lib, params, *args, **kwargs):
        counts.append(len(params))
        return step(lib, params, *args, **kwargs)

    monkeypatch.setattr(lamb_native, "step", spy)
    return counts


def train(dtype, seed, *, native=True, weight_decay=0.02, steps=6, guarded=True):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype) * 0.1) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) * 10.0 ** float(torch.randint(-3, 2, (), generator=gen))
              for s in SHAPES] for _ in range(steps)]
    optimizer = LAMB(params, lr=1e-2, weight_decay=weight_decay)
    optimizer.native_rules = native
    optimizer.compile_rules = False  # the reference is the eager rule
    for step, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        if guarded and step >= 3:  # a clip coefficient and a skip flag (step 4 skipped, with a NaN grad)
            defer_guard(optimizer, params, dtype, skipped=step == 4)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("weight_decay", [0.0, 0.02])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_step_gives_the_eager_rules_results(dtype, weight_decay, gen, native_calls):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    ours, opt = train(dtype, seed, weight_decay=weight_decay)
    again, _ = train(dtype, seed, weight_decay=weight_decay)
    assert native_calls and set(native_calls) == {len(NATIVE)}
    native_calls.clear()
    eager, opt_eager = train(dtype, seed, native=False, weight_decay=weight_decay)
    assert not native_calls
    # Eager sqrt is within 1 ulp of the correctly rounded one, and the norms differ by their roundoff.
    rel = 1e-6 if dtype == torch.float32 else 1e-14
    for i, (a, b, c) in enumerate(zip(ours, again, eager)):
        assert a.dtype == dtype and torch.equal(a, b)  # run to run: the same bits
        assert (a.double() - c.double()).abs().max() <= rel * c.double().abs().max()
        for name in ("exp_avg", "exp_avg_sq"):  # the moments: the same ops, the same FMAs: bit for bit
            assert opt.state[a][name].dtype == dtype
            assert torch.equal(opt.state[a][name], opt_eager.state[c][name]), (i, name)
        assert torch.equal(a.grad, c.grad)  # the last step's grads scaled in place as the eager rule does
    # u lives in the kernel's scratch rows only: no per-parameter direction buffer for the kernel's tensors
    assert not {ours[i] for i in NATIVE} & set(opt.__dict__.get("_updates", {}))
    rows = opt.__dict__["_native_rows"][dtype]
    assert rows.shape[1] == max(ours[i].numel() for i in NATIVE)
    assert opt.scratch_nbytes() >= rows.numel() * rows.element_size()  # counted where a user reads memory


def test_native_bits_do_not_depend_on_the_thread_count(gen):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            params, opt = train(torch.float32, seed, steps=3, guarded=False)
            results.append((params, opt))
    finally:
        torch.set_num_threads(threads)
    (first, opt_first), rest = results[0], results[1:]
    for params, opt in rest:
        for a, b in zip(first, params):
            assert torch.equal(a, b)
            assert all(torch.equal(opt_first.state[a][k], opt.state[b][k]) for k in ("exp_avg", "exp_avg_sq"))


def test_native_skipped_step_leaves_every_bit(gen):
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = LAMB(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    grads = []
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
        grads.append(p.grad.clone())
    params[2].grad[5] = float("nan")
    grads[2][5] = float("nan")
    opt.defer_grad_scale(torch.tensor(0.25))
    opt.defer_skip(torch.isnan(params[2].grad).any())  # on device: no host sync
    opt.step()
    for p, old, st, g in zip(params, before, state, grads):
        assert torch.equal(p, old)
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
        torch.testing.assert_close(p.grad, g * 0.25, rtol=0, atol=0, equal_nan=True)  # scaled, as eagerly


def test_a_scratch_too_small_is_refused_before_the_kernel_runs(gen):
    params = [torch.randn(2000, generator=gen), torch.randn(3000, generator=gen)]
    state = [torch.zeros_like(p) for p in params]
    one = torch.ones((), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"at least \d+ x 3000 elements, got torch.float32 \(1, 2000\)"):
        lamb_native.step(lamb_native.library(), params, [p.clone() for p in params], state, [s.clone() for s in state],
                         [one, one], [one, one], None, None, torch.empty(1, 2000), c1=0.1, beta2=0.999, c2=0.001,
                         eps=1e-6, weight_decay=0.0, max_trust_ratio=10.0, lr=1e-3)


def test_partition_takes_large_contiguous_cpu_float_tensors_of_one_dtype():
    big = [torch.randn(1200), torch.randn(1500, dtype=torch.float64), torch.randn(50, 40).t(), torch.randn(10),
           torch.randn(2000), torch.randn(1100).half()]
    lists = {"param": big, "grad": [torch.randn_like(t) for t in big]}
    lists["grad"][2] = torch.randn(40, 50).t()
    opt = LAMB([torch.nn.Parameter(t.float().contiguous()) for t in big])
    assert lamb_native.partition(opt, lists) == ([0, 4], [1, 2, 3, 5])
    opt.native_rules = False
    assert lamb_native.partition(opt, lists) == ([], [0, 1, 2, 3, 4, 5])


def test_switches_turn_the_kernel_off(gen, monkeypatch, native_calls):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    monkeypatch.setenv(lamb_native.ENV, "0")
    off, _ = train(torch.float32, seed, steps=2)
    assert not native_calls
    monkeypatch.delenv(lamb_native.ENV)
    eager, _ = train(torch.float32, seed, steps=2, native=False)
    assert not native_calls
    assert all(torch.equal(a, b) for a, b in zip(off, eager))


def test_without_a_compiler_the_step_falls_back(gen, monkeypatch, caplog, tmp_path):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LIGHTNING_OPTKIT_CACHE", str(tmp_path / "cache"))  # nothing built there yet
    lamb_native._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lightning_optkit.kernels"):
            fallback, _ = train(torch.float32, seed, steps=2)
        assert lamb_native.library() is None
        assert "native LAMB kernel is unavailable" in caplog.text
    finally:
        lamb_native._load.cache_clear()
    eager, _ = train(torch.float32, seed, steps=2, native=False)
    assert all(torch.equal(a, b) for a, b in zip(fallback, eager))


def test_float32_and_float64_parameters_in_one_optimizer(gen, native_calls):
    """Each dtype is its own bucket with its own scratch rows; both match the eager rule, step after step."""
    seed = int(torch.randint(0, 2**31, (), generator=gen))

    def run(native: bool):
        g = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(1500, generator=g, dtype=dtype)) for dtype in
                  (torch.float32, torch.float64, torch.float32)]
        opt = LAMB(params, lr=1e-2)
        opt.native_rules, opt.compile_rules = native, False
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()
        return params, opt

    (ours, opt), calls = run(True), list(native_calls)
    eager, _ = run(False)
    assert sorted(calls) == [1, 1, 1, 2, 2, 2]  # per step: the fp32 pair in one call, the fp64 one in another
    assert set(opt.__dict__["_native_rows"]) == {torch.float32, torch.float64}
    for a, b in zip(ours, eager):
        rel = 1e-6 if a.dtype == torch.float32 else 1e-14
        assert a.dtype == b.dtype and (a.double() - b.double()).abs().max() <= rel * b.double().abs().max()
