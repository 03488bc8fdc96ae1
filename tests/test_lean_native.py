"""The native CPU kernel of the lean step (kernels/lean_native.c): it follows the torch-op path, does not
depend on the thread count, is switched off by its environment variable, and without a C compiler the
step falls back to torch ops."""

from __future__ import annotations

import logging

import pytest
import torch
from test_lean_adamw import test_int8_step_matches_a_float64_reference_of_the_same_algorithm as int8_reference
from torch import nn

from lightning_optkit.kernels import lean_native
from lightning_optkit.optim.fused_adamw import FusedAdamW

SHAPES = [(6, 700), (3, 2053), (40, 100), (64, 256)]  # short last blocks, several blocks per row, one block
LR = 1e-2

pytestmark = pytest.mark.skipif(lean_native.library() is None, reason="no C compiler for the native kernel")


def _run(native: bool, state_dtype: str, dtype: torch.dtype, seed: int, monkeypatch, steps: int = 4,
         shapes=SHAPES):
    monkeypatch.setenv(lean_native.NATIVE_ENV, "1" if native else "0")
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = FusedAdamW(params, lr=LR, state_dtype=state_dtype, lean_min_numel=100, max_grad_norm=1.0,
                     stochastic_rounding=True, rounding_seed=3, backend="torch")
    for _ in range(steps):
        for p in params:  # gradient sizes from 1e-4 to 10
            size = 10.0 ** float(torch.randint(-4, 2, (), generator=gen))
            p.grad = (torch.randn(p.shape, generator=gen) * size).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16", "float32"])
def test_native_kernel_follows_the_torch_op_path(state_dtype, dtype, gen, monkeypatch):
    if state_dtype == "float32" and dtype == torch.float32:
        pytest.skip("fp32 parameters with fp32 state take torch's fused AdamW, not the lean path")
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    ours, ref = _run(True, state_dtype, dtype, seed, monkeypatch), _run(False, state_dtype, dtype, seed, monkeypatch)
    for p, q in zip(ours[0], ref[0]):
        st, rs = ours[1].state[p], ref[1].state[q]
        assert st.keys() == rs.keys() and all(st[k].dtype == rs[k].dtype for k in st)
        assert torch.equal(st["step"], rs["step"])
        # the same fp32 operations up to their order (torch's vectorized kernels, the reciprocal of the
        # block maximum): a code moves by a step where a value sits on a rounding boundary, and over 4
        # steps by up to 3 where bf16 parameters amplify it (measured on 20 seeds: at most 3, 0.07% of codes)
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = st[key].double(), rs[key].double()
            if state_dtype == "int8":
                assert (a - b).abs().max() <= (1 if dtype == torch.float32 else 4)
                assert (a != b).double().mean() <= 0.005
            elif state_dtype == "bfloat16":  # the same noise: a bf16 step where the fp32 values differ
                bound = torch.maximum(a.abs(), b.abs()) * 2**-6 + 2**-20 * b.abs().max()
                assert ((a - b).abs() <= bound).all() and (a != b).double().mean() <= 0.01
            else:  # fp32 moments: v's multiply-add in another order (up to 27% of elements by an fp32 ulp)
                assert ((a - b).abs() <= 2**-20 * a.abs()).all()
        for key in ("exp_avg_scale", "exp_avg_sq_scale"):
            if key in st:
                torch.testing.assert_close(st[key], rs[key], rtol=1e-2, atol=0)
        ulp = p.detach().double().abs() * (2**-7 if dtype == torch.bfloat16 else 2**-22)
        diff = (p.detach().double() - q.detach().double()).abs()
        assert (diff <= 2 * ulp + 0.5 * LR).all()
        assert (diff <= ulp + 0.05 * LR).double().mean() >= 0.99


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_thread_count_does_not_change_a_bit(state_dtype, gen, monkeypatch):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    threads = torch.get_num_threads()
    shapes = [(300, 1100)]  # 330K elements: 5 threads' worth of rows
    try:
        torch.set_num_threads(1)
        one = _run(True, state_dtype, torch.bfloat16, seed, monkeypatch, steps=2, shapes=shapes)
        torch.set_num_threads(4)
        four = _run(True, state_dtype, torch.bfloat16, seed, monkeypatch, steps=2, shapes=shapes)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0][0], four[0][0])
    for key, value in one[1].state[one[0][0]].items():
        assert torch.equal(four[1].state[four[0][0]][key], value), key


def test_int8_reference_holds_on_the_torch_op_path_too(gen, monkeypatch):
    monkeypatch.setenv(lean_native.NATIVE_ENV, "0")
    int8_reference(0.5, gen)


def _paths(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.name == "lightning_optkit.kernels")


def test_environment_variable_switches_the_native_kernel_off(gen, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="lightning_optkit.kernels")
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    _run(True, "int8", torch.float32, seed, monkeypatch, steps=1)
    assert "adamw-int8/native" in _paths(caplog)
    caplog.clear()
    _run(False, "int8", torch.float32, seed, monkeypatch, steps=1)
    assert "adamw-int8/torch" in _paths(caplog) and "native" not in _paths(caplog)


def test_without_a_compiler_the_step_falls_back_to_torch_ops(gen, monkeypatch, caplog, tmp_path):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(lean_native.CACHE_ENV, str(tmp_path / "cache"))  # nothing built there yet
    lean_native._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lightning_optkit.kernels"):
            fallback = _run(True, "int8", torch.float32, seed, monkeypatch, steps=2)
        assert lean_native.library() is None
        assert "native lean AdamW kernel is unavailable" in caplog.text
    finally:
        lean_native._load.cache_clear()
    eager = _run(False, "int8", torch.float32, seed, monkeypatch, steps=2)
    for p, q in zip(fallback[0], eager[0]):
        assert torch.equal(p, q)
        assert all(torch.equal(fallback[1].state[p][k], v) for k, v in eager[1].state[q].items())


@pytest.mark.parametrize("native", [True, False])
def test_a_shard_keyed_by_its_offset_rounds_like_the_whole_tensor(native, gen, monkeypatch):
    """bf16 state (element-wise): two row shards stepped with their flat offsets equal the whole tensor."""
    from lightning_optkit.kernels.lean_adamw import LeanHyper, lean_adamw
    from lightning_optkit.optim.lean_state import new_state

    monkeypatch.setenv(lean_native.NATIVE_ENV, "1" if native else "0")
    p = torch.randn(64, 300, generator=gen).bfloat16()
    hyper = LeanHyper(lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)

    def state() -> dict[str, torch.Tensor]:
        return {"step": torch.zeros(()), **new_state(p, "bfloat16")}

    whole, whole_state = p.clone(), state()
    shards = [p[:33].clone(), p[33:].clone()]
    shard_states = [{"step": torch.zeros(()), **new_state(s, "bfloat16")} for s in shards]
    for _ in range(3):
        g = torch.randn(p.shape, generator=gen).bfloat16()
        lean_adamw([whole], [g], [whole_state], [4], hyper, seed=9, stochastic_params=True)
        lean_adamw(shards, [g[:33].contiguous(), g[33:].contiguous()], shard_states, [4, 4], hyper, seed=9,
                   stochastic_params=True, offsets=[0, 33 * 300])
    assert torch.equal(torch.cat(shards), whole)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(torch.cat([s[key] for s in shard_states]), whole_state[key])
