"""The native CPU kernel of LAMB's step (``lamb_native.c``): every large CPU tensor of a group in one call.

Per tensor, the moments, the direction ``u`` (into a scratch row), both norms, the trust ratio and the
parameter update run while the tensor is in cache; one call per step covers all of them, so a step has no
per-tensor Python or dispatch cost. The results equal the eager rule's (:meth:`LAMB._direction` and the trust
ratio of :meth:`LAMB._update`) but for roundoff: its sqrt and its norms (accumulated in double here). The
bits do not depend on the thread count (a tensor is updated by one thread, in one order) and repeat run to
run.

Takes the tensors :func:`lightning_optkit.kernels.compiled.eligible` accepts (CPU, float32/float64,
contiguous, at least ``compiled.MIN_NUMEL`` elements). ``LIGHTNING_OPTKIT_LAMB_NATIVE=0`` or
``optimizer.native_rules = False`` turns it off (the compiled rule runs instead); without a C compiler it is
off, with one warning.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_optkit.kernels import compiled, native

ENV = "LIGHTNING_OPTKIT_LAMB_NATIVE"
SOURCE = Path(__file__).with_name("lamb_native.c")
_P = ctypes.c_void_p
_ARGTYPES = [ctypes.c_int64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int, _P,
             ctypes.c_int64, ctypes.c_int]


@lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | None:
    return native.load(SOURCE, {"lamb_native": _ARGTYPES}, "LAMB kernel", ENV)


def library(owner: Any = None) -> ctypes.CDLL | None:
    """The loaded kernel, or ``None``: switched off (env, ``owner.native_rules``) or no compiler."""
    if not native.switched_on(ENV) or not getattr(owner, "native_rules", True):
        return None
    return _load()


def _pointers(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (_P * len(tensors))(*(t.data_ptr() for t in tensors))


def step(
    lib: ctypes.CDLL, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    bc1: list[Tensor], bc2: list[Tensor], scale: Tensor | None, skip: Tensor | None, scratch: Tensor, *,
    c1: float, beta2: float, c2: float, eps: float, weight_decay: float, max_trust_ratio: float, lr: float,
) -> None:
    """One LAMB step of ``params`` (one dtype, all eligible), in place; ``bc1``/``bc2``: 0-d bias corrections
    of the parameters' dtype; ``scale`` (0-d, that dtype) multiplies the gradients in place first; a true
    0-d bool ``skip`` leaves everything but the scaled gradients untouched. ``scratch``: contiguous, that
    dtype, at least :func:`scratch_shape` (threads x largest numel); the kernel runs that many threads even
    when ``scratch`` has more rows. No host sync: the kernel reads the 0-d tensors where they are."""
    dtype = params[0].dtype
    threads, row = scratch_shape(params)
    if scratch.dtype != dtype or scratch.shape[0] < threads or scratch.shape[1] < row or not scratch.is_contiguous():
        raise ValueError(f"LAMB's native kernel needs a contiguous {dtype} scratch of at least {threads} x {row} "
                         f"elements, got {scratch.dtype} {tuple(scratch.shape)}")
    row = scratch.shape[1]  # the stride between the threads' rows
    hyper = (ctypes.c_double * 7)(c1, beta2, c2, eps, weight_decay, max_trust_ratio, -lr)
    numel = (ctypes.c_int64 * len(params))(*(p.numel() for p in params))
    lib.lamb_native(len(params), numel, _pointers(params), _pointers(grads), _pointers(exp_avgs),
                    _pointers(exp_avg_sqs), _pointers(bc1), _pointers(bc2),
                    None if scale is None else scale.data_ptr(), None if skip is None else skip.data_ptr(),
                    hyper, int(weight_decay != 0), int(dtype == torch.float64), scratch.data_ptr(), row, threads)


def scratch_shape(params: Sequence[Tensor]) -> tuple[int, int]:
    """(threads, elements per thread) of the scratch :func:`step` needs: one row, the largest tensor, per thread
    that will have a tensor to take."""
    threads = max(1, min(torch.get_num_threads(), len(params)))
    return threads, max(p.numel() for p in params)


def partition(owner: Any, lists: dict[str, list[Tensor]]) -> tuple[list[int], list[int]]:
    """Indices of the tensors of aligned ``lists`` the kernel takes (all of one dtype: the first eligible
    tensor's), and of the rest; none when the kernel is off."""
    count = len(next(iter(lists.values())))
    if not count or library(owner) is None:
        return [], list(range(count))
    fast, rest, dtype = [], [], None
    for i in range(count):
        aligned = [ts[i] for ts in lists.values()]
        if compiled.eligible(aligned) and dtype in (None, aligned[0].dtype):
            dtype = aligned[0].dtype
            fast.append(i)
        else:
            rest.append(i)
    return fast, rest
