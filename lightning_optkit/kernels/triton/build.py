"""Build a Triton kernel in the mode its tensors need: compiled for CUDA, interpreted for CPU.

``triton.jit`` decides compiled-or-interpreted from ``TRITON_INTERPRET`` when the decorator runs, so a
module-level ``@triton.jit`` would fix that choice for the whole process at import. Building each variant
on first use, inside a ``triton.knobs`` scope, keeps the choice per device and leaves the process-wide
setting (and other modules' kernels) alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton

from lightning_optkit.kernels.dispatch import interpreter_enabled


class DeviceKernel:
    """A kernel function, jitted lazily as compiled (CUDA) or interpreted (CPU, ``TRITON_INTERPRET=1``)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._variants: dict[bool, Any] = {}

    def _variant(self, interpret: bool) -> Any:
        kernel = self._variants.get(interpret)
        if kernel is None:
            with triton.knobs.runtime.scope():
                triton.knobs.runtime.interpret = interpret
                kernel = triton.jit(self.fn)
            self._variants[interpret] = kernel
        return kernel

    def for_device(self, device: torch.device) -> Any:
        """The launchable kernel for tensors on ``device``."""
        if device.type == "cpu":
            if not interpreter_enabled():
                raise ValueError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter); "
                                 "use backend='torch' for CPU training")
            return self._variant(True)
        return self._variant(False)


def device_kernel(fn: Callable[..., Any]) -> DeviceKernel:
    """Decorator: wrap a Triton kernel function as a :class:`DeviceKernel`."""
    return DeviceKernel(fn)
