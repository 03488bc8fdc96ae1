"""The Triton kernels compile for a real GPU target (sm_90) without a GPU, with vectorised accesses.

The interpreter tests check the numerics; this checks what the interpreter cannot: that the kernels
lower through Triton's compiler to PTX (typing, constexpr use, pointer casts), and that the aligned
fast path gives 16-byte vector loads and stores, which table-loaded pointers would otherwise lose.
"""

from __future__ import annotations

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lightning_optkit.kernels.triton.adamw import _adamw_kernel  # noqa: E402
from lightning_optkit.kernels.triton.lion import _lion_kernel  # noqa: E402
from lightning_optkit.kernels.triton.norm import _sumsq_kernel  # noqa: E402
from lightning_optkit.kernels.triton.sgd import _sgd_kernel  # noqa: E402

FLOAT_ARGS = {"beta1", "beta2", "eps", "weight_decay", "momentum"}
TABLE_ARGS = {"state_ptrs", "grad_ptrs", "numels", "chunk_start", "seed_ptr"}


def _signature(fn, param_type: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "n_tensors":
            sig[name] = "i32"
        elif name in TABLE_ARGS:
            sig[name] = "*i64"
        elif name == "chunk_tensor":
            sig[name] = "*i32"
        elif name in ("P_REF", "G_REF"):
            sig[name] = param_type
        else:  # device scalars, per-tensor step sizes, fp32 state (S_REF), partial sums
            sig[name] = "*fp32"
    return sig


FLAGS = dict(HAS_MULT=True, HAS_SKIP=True, MAXIMIZE=False, BLOCK=4096)
KERNELS = {
    "adamw": (_adamw_kernel, dict(FLAGS, AMSGRAD=True)),
    "sgd": (_sgd_kernel, dict(FLAGS, HAS_MOMENTUM=True, NESTEROV=True)),
    "lion": (_lion_kernel, FLAGS),
    "sumsq": (_sumsq_kernel, dict(BLOCK=4096)),
}


def _ptx(name: str, param_type: str, aligned: bool) -> str:
    kernel, flags = KERNELS[name]
    constexprs = dict(flags, ALIGNED=aligned)
    if name != "sumsq":
        constexprs["BF16_PARAMS"] = param_type == "*bf16"
    if name == "adamw":
        constexprs["STOCHASTIC"] = param_type == "*bf16"  # stochastic rounding of bf16 stores
    source = ASTSource(fn=kernel.for_device(torch.device("cuda")), constexprs=constexprs,
                       signature=_signature(kernel.fn, param_type, constexprs))
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    except (RuntimeError, FileNotFoundError) as err:  # no bundled ptxas / CUDA backend in this triton
        pytest.skip(f"Triton cannot compile for sm_90 here: {err}")
    return compiled.asm["ptx"]


@pytest.mark.parametrize("param_type", ["*fp32", "*bf16"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_for_sm90_with_vector_accesses(name, param_type):
    ptx = _ptx(name, param_type, aligned=True)
    assert "ld.global.v4" in ptx
    if name != "sumsq":
        assert "st.global.v4" in ptx


def test_unaligned_pointers_compile_without_vector_assumptions():
    assert "ld.global.v4" not in _ptx("adamw", "*fp32", aligned=False)
