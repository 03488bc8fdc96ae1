"""The Triton kernel for lean state, through Triton's CPU interpreter: it follows the torch path (same
codes, same stochastic-rounding noise) and skips without touching anything; and it compiles for sm_90."""

from __future__ import annotations

import inspect

import pytest
import torch
from kernel_helpers import use_backend
from torch import nn

from lightning_optkit.kernels import lean_native
from lightning_optkit.optim.fused_adamw import FusedAdamW

pytest.importorskip("triton")

SHAPES = [(6, 700), (3, 2053), (40, 100)]  # short last blocks, a row longer than one program's tile
LR = 1e-2


def _run(backend: str, state_dtype: str, dtype: torch.dtype, seed: int, steps: int = 3):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = FusedAdamW(params, lr=LR, state_dtype=state_dtype, backend=backend, lean_min_numel=100,
                     max_grad_norm=1.0, stochastic_rounding=True, rounding_seed=11)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_triton_kernel_follows_the_torch_path(state_dtype, dtype, gen, monkeypatch):
    use_backend("triton", monkeypatch)
    # the torch-op path, not the native CPU kernel (test_lean_native compares that one with torch ops)
    monkeypatch.setenv(lean_native.NATIVE_ENV, "0")
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    ours, ref = _run("triton", state_dtype, dtype, seed), _run("torch", state_dtype, dtype, seed)
    for p, q in zip(ours[0], ref[0]):
        st, rs = ours[1].state[p], ref[1].state[q]
        assert st.keys() == rs.keys() and all(st[k].dtype == rs[k].dtype for k in st)
        # fp32 math in another order (torch's lerp/addcmul fuse multiply-adds): results agree to rounding,
        # which can move a code by one step, or a bf16 value by one (and so by two after further steps), for
        # the rare element on a boundary
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = st[key].double(), rs[key].double()
            if state_dtype == "int8":
                assert (a - b).abs().max() <= 1 and (a != b).double().mean() <= 0.01
            else:
                # two bf16 steps, or one step of the inputs where m = 0.9 m + 0.1 g nearly cancels
                bound = torch.maximum(a.abs(), b.abs()) * 2**-6 + 2**-8 * b.abs().max()
                assert ((a - b).abs() <= bound).all() and (a != b).double().mean() <= 0.01
        for key in ("exp_avg_scale", "exp_avg_sq_scale"):
            if key in st:
                torch.testing.assert_close(st[key], rs[key], rtol=2e-2, atol=0)
        ulp = p.detach().double().abs() * (2**-7 if dtype == torch.bfloat16 else 2**-22)
        diff = (p.detach().double() - q.detach().double()).abs()
        assert (diff <= ulp + 0.03 * LR).all()


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_triton_kernel_skips_a_nan_step_bit_for_bit(state_dtype, gen, monkeypatch):
    use_backend("triton", monkeypatch)
    params, opt = _run("triton", state_dtype, torch.float32, int(torch.randint(0, 2**31, (), generator=gen)), 2)
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[2].grad[5, 7] = float("nan")
    opt.step()
    for p, (p0, st0) in zip(params, before):
        assert torch.equal(p.detach(), p0)
        assert all(torch.equal(opt.state[p][k], v) for k, v in st0.items())


@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("param_type", ["*fp32", "*bf16"])
def test_lean_kernel_compiles_for_sm90(int8, param_type):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lightning_optkit.kernels.triton.lean_adamw import TILE_BLOCKS, _lean_adamw_kernel

    constexprs = dict(INT8=int8, HAS_MULT=True, HAS_SKIP=True, MAXIMIZE=False, BF16_PARAMS=param_type == "*bf16",
                      STOCHASTIC_PARAMS=param_type == "*bf16", ALIGNED=True, NB=TILE_BLOCKS)
    types = {"ptrs": "*i64", "grad_ptrs": "*i64", "prog_tensor": "*i32", "prog_start": "*i64", "prog_end": "*i64",
             "prog_scale": "*i64", "n_tensors": "i32", "mkey_ptr": "*i64", "pkey_ptr": "*i64",
             "P_REF": param_type, "M_REF": "*i8" if int8 else "*bf16", "V_REF": "*u8" if int8 else "*bf16"}
    signature = {}
    for name in inspect.signature(_lean_adamw_kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("beta1", "beta2", "eps", "m_unit", "v_unit"):
            signature[name] = "fp32"
        else:
            signature[name] = types.get(name, "*fp32")
    source = ASTSource(fn=_lean_adamw_kernel.for_device(torch.device("cuda")), constexprs=constexprs,
                       signature=signature)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    except (RuntimeError, FileNotFoundError) as err:  # no bundled ptxas / CUDA backend in this triton
        pytest.skip(f"Triton cannot compile for sm_90 here: {err}")
    ptx = compiled.asm["ptx"]
    assert "st.global" in ptx and "ld.global" in ptx
    if int8:  # the block maxima are a reduction inside the program
        assert "max.f32" in ptx or "max.NaN.f32" in ptx
