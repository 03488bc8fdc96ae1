"""Build a Triton kernel in the mode its tensors need: compiled for CUDA, interpreted for CPU.

``triton.jit`` decides compiled-or-interpreted from ``TRITON_INTERPRET`` when the decorator runs, so a
module-level ``@triton.jit`` would fix that choice for the whole process at import. Building each variant
on first use, inside a ``triton.knobs`` scope, keeps the choice per device and leaves the process-wide
setting (and other modules' kernels) alone.

The same holds for the helper functions a kernel calls: a compiled kernel can only call a compiled
``JITFunction``, and an interpreted kernel only an interpreted one. Helpers are therefore declared with
:func:`device_function`, and each kernel variant is built against a copy of its module's globals in which
every such helper is replaced by the helper's variant of the same mode (recursively, for helpers that call
helpers).
"""

from __future__ import annotations

import dis
import types
from collections.abc import Callable
from typing import Any

import torch
import triton

from lightning_optkit.kernels.dispatch import interpreter_enabled


class DeviceFunction:
    """A Triton function, jitted lazily as compiled or interpreted, with its helpers in the same mode."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._variants: dict[bool, Any] = {}

    def variant(self, interpret: bool) -> Any:
        """``triton.jit`` of the function, interpreted or compiled, calling helpers built the same way."""
        jitted = self._variants.get(interpret)
        if jitted is None:
            fn = _with_helpers(self.fn, interpret)
            with triton.knobs.runtime.scope():
                triton.knobs.runtime.interpret = interpret
                jitted = triton.jit(fn)
            self._variants[interpret] = jitted
        return jitted


class DeviceKernel(DeviceFunction):
    """A kernel function, jitted lazily as compiled (CUDA) or interpreted (CPU, ``TRITON_INTERPRET=1``)."""

    def for_device(self, device: torch.device) -> Any:
        """The launchable kernel for tensors on ``device``."""
        if device.type == "cpu":
            if not interpreter_enabled():
                raise ValueError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter); "
                                 "use backend='torch' for CPU training")
            return self.variant(True)
        return self.variant(False)


def _with_helpers(fn: Callable[..., Any], interpret: bool) -> Callable[..., Any]:
    """``fn`` itself, or a copy whose globals map each :class:`DeviceFunction` to its ``interpret`` variant.

    The copy shares ``fn``'s code object, so Triton still finds the source (``inspect.getsource`` goes by
    the code's file and line) and resolves every other global name as before.
    """
    names = {ins.argval for ins in dis.get_instructions(fn) if ins.opname == "LOAD_GLOBAL"}  # not attributes
    helpers = {name: fn.__globals__[name].variant(interpret) for name in names
               if isinstance(fn.__globals__.get(name), DeviceFunction)}
    if not helpers:
        return fn
    rebound = types.FunctionType(fn.__code__, {**fn.__globals__, **helpers}, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
    rebound.__kwdefaults__ = fn.__kwdefaults__
    rebound.__annotations__ = fn.__annotations__
    rebound.__module__ = fn.__module__
    rebound.__qualname__ = fn.__qualname__
    rebound.__doc__ = fn.__doc__
    return rebound


def device_kernel(fn: Callable[..., Any]) -> DeviceKernel:
    """Decorator: wrap a Triton kernel function as a :class:`DeviceKernel`."""
    return DeviceKernel(fn)


def device_function(fn: Callable[..., Any]) -> DeviceFunction:
    """Decorator: wrap a Triton helper (called from kernels, never launched) as a :class:`DeviceFunction`."""
    return DeviceFunction(fn)
