"""TorchCalls: record every torch function a block of code calls, to prove a step makes no host transfer."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# Calls that copy a tensor's value to the host (and so wait for the device).
HOST_TRANSFERS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__",
                  "__repr__", "__array__", "to(cpu)"}


class TorchCalls(TorchFunctionMode):
    """Names of every torch function / tensor method called while active, ``.to('cpu')`` as ``to(cpu)``.

    ``any_tensor_to_cpu``: count ``.to('cpu')`` of any tensor, as it would sync on a GPU machine (for code
    that never moves tensors legitimately); otherwise only of a non-CPU tensor (torch's own distributed code
    calls ``.to(device)`` on CPU tensors here, which moves nothing).
    """

    def __init__(self, any_tensor_to_cpu: bool = False) -> None:
        super().__init__()
        self.names: list[str] = []
        self.any_tensor_to_cpu = any_tensor_to_cpu

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        moves = name == "to" and (self.any_tensor_to_cpu
                                  or (isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"))
        if moves and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values())):
            name = "to(cpu)"
        self.names.append(name)
        return func(*args, **kwargs)
