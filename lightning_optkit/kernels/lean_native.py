"""The native CPU kernel of the lean AdamW step: ``lean_native.c``, built with the system C compiler.

Built, cached and loaded by :mod:`lightning_optkit.kernels.native` (``-O3 -march=native -ffp-contract=off``
and no fast-math: every fp32 operation is IEEE and in a fixed order, so results are bit-identical run to
run, for any thread count, and the same on any CPU the library runs on).

``LIGHTNING_OPTKIT_LEAN_NATIVE=0`` turns it off (the torch-op path runs instead). Without a working
compiler, or when loading fails, :func:`library` returns ``None`` once logged, and the torch-op path runs.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from lightning_optkit.kernels import native

NATIVE_ENV = "LIGHTNING_OPTKIT_LEAN_NATIVE"
CACHE_ENV = native.CACHE_ENV
SOURCE = Path(__file__).with_name("lean_native.c")
KINDS = {"float32": 0, "bfloat16": 1, "int8": 2}
#: Elements per thread below which a tensor is updated by one thread (thread start costs ~20 us).
MIN_PER_THREAD = 1 << 16
_STATE_KEYS = {"step", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"}

_argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
             ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]


def enabled() -> bool:
    """False when ``LIGHTNING_OPTKIT_LEAN_NATIVE`` is 0/false/off/no."""
    return native.switched_on(NATIVE_ENV)


@lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | None:
    return native.load(SOURCE, {"lean_adamw_native": _argtypes}, "lean AdamW kernel", NATIVE_ENV)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or ``None`` (turned off, or no compiler / failed build)."""
    return _load() if enabled() else None


def suits(p: Tensor, g: Tensor, state: dict[str, Tensor], kind: str) -> bool:
    """Whether the native kernel takes this tensor: CPU, fp32/bf16 parameter and gradient, contiguous."""
    ok = (torch.float32, torch.bfloat16)
    moment = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}[kind]
    return (p.device.type == "cpu" and p.dtype in ok and g.dtype in ok and p.is_contiguous() and g.is_contiguous()
            and state["exp_avg"].dtype == moment and set(state) <= _STATE_KEYS
            and all(t.device.type == "cpu" and t.is_contiguous() for t in state.values()))


def step(lib: ctypes.CDLL, p: Tensor, g: Tensor, state: dict[str, Tensor], kind: str, hyper: Tensor,
         keys: Tensor, *, maximize: bool, param_sr: bool) -> None:
    """One lean AdamW step of one tensor, in place.

    ``hyper``: contiguous fp32 (9,) tensor (1 - beta1, beta2, 1 - beta2, eps, step size, sqrt of the
    second bias correction, decay factor, gradient multiplier, keep flag); ``keys``: int64 (2,) tensor
    (moment key, parameter key). Both are read by the kernel in place: no host sync.
    """
    if p.numel() == 0:
        return
    rows = p.shape[0] if p.dim() else 1
    length = p.numel() // rows
    threads = max(1, min(torch.get_num_threads(), p.numel() // MIN_PER_THREAD))
    scale_m = state.get("exp_avg_scale")
    scale_v = state.get("exp_avg_sq_scale")
    lib.lean_adamw_native(
        rows, length, p.data_ptr(), int(p.dtype == torch.bfloat16), g.data_ptr(), int(g.dtype == torch.bfloat16),
        state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
        None if scale_m is None else scale_m.data_ptr(), None if scale_v is None else scale_v.data_ptr(),
        KINDS[kind], int(maximize), int(param_sr), hyper.data_ptr(), keys.data_ptr(), threads)
