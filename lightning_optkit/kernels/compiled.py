"""Compiled element-wise rules: one fused pass per tensor on CPU (``torch.compile``, Inductor's C++ backend).

A kit rule written as eager tensor ops makes one pass over memory (or over a cache-sized block) per op; the
same rule compiled runs all its ops in one loop per tensor, in registers: each input is read once and each
output written once. :class:`CompiledRule` wraps one such rule (a function of tensors that writes its outputs
with ``copy_``). It is compiled on first use with dynamic shapes (one compile serves every tensor size) and
``fullgraph=True``; torch.compile's guards recompile it per dtype, thread count and Python-level variant (the
rule's bool options), and every number that can change from step to step (lr, bias corrections) reaches it as
a 0-d tensor, so a schedule does not recompile it. Element-wise kernels have no reduction order to vary, so
results are the same run to run.

Where it is used (:func:`eligible`): CPU tensors of float32 or float64 (float64 stays float64 throughout), all
contiguous, with at least :data:`MIN_NUMEL` elements (tiny tensors keep the eager rule: a compiled call's fixed
cost is tens of microseconds). Switched off for the process by the environment variable
``LIGHTNING_OPTKIT_COMPILE=0`` (read at each step), per optimizer by ``optimizer.compile_rules = False``; the
first compile failure (no Inductor, no C++ compiler) warns once and switches it off for the process, and
callers then run their eager rule. A compiled rule computes what its eager rule computes, op for op, but may
round differently where eager torch fuses a multiply and add (``lerp``, ``add(alpha=)``) and the compiled loop
does not (Inductor compiles with ``-ffp-contract=off``): a rule can ask for contraction (``contract=True``) when
that is what matches eager bit for bit.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

#: Environment variable: "0", "false" or "off" never compiles (the eager rules run).
ENV = "LIGHTNING_OPTKIT_COMPILE"
#: Tensors below this many elements keep the eager rule.
MIN_NUMEL = 1 << 16
#: Tensors per compiled call (a call costs about 100 us besides its work; a chunk of 8 shares it).
CHUNK = 8
_DTYPES = (torch.float32, torch.float64)
_failed = False


def enabled(owner: Any = None) -> bool:
    """Whether compiled rules may run now: not switched off (env, ``owner.compile_rules``) and no failed compile."""
    if _failed or os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return bool(getattr(owner, "compile_rules", True))


def eligible(aligned: Sequence[Tensor]) -> bool:
    """Whether one tensor's aligned pieces (parameter, gradient, state) can go through a compiled rule."""
    first = aligned[0]
    return (first.device.type == "cpu" and first.dtype in _DTYPES and first.numel() >= MIN_NUMEL
            and all(t.dtype == first.dtype and t.is_contiguous() and t.device == first.device for t in aligned))


def partition(owner: Any, lists: dict[str, list[Tensor]]) -> tuple[list[int], list[int]]:
    """Indices of the tensors of aligned ``lists`` a compiled rule takes, and of the rest (the eager rule's)."""
    count = len(next(iter(lists.values())))
    if not count or not enabled(owner):
        return [], list(range(count))
    fast, rest = [], []
    for i in range(count):
        (fast if eligible([ts[i] for ts in lists.values()]) else rest).append(i)
    return fast, rest


def chunks(indices: Sequence[int], size: int | None = None) -> list[list[int]]:
    """``indices`` in runs of :data:`CHUNK` (one compiled call each), the remainder last."""
    size = size or CHUNK
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]


def subset(lists: dict[str, list[Tensor]], indices: Sequence[int]) -> dict[str, list[Tensor]]:
    """The ``indices`` entries of each list."""
    return {name: [ts[i] for i in indices] for name, ts in lists.items()}


def constants(like: Tensor, **values: float) -> dict[str, Tensor]:
    """Python numbers as 0-d tensors of ``like``'s dtype and device (the value a foreach op would use)."""
    return {name: torch.full((), value, dtype=like.dtype, device=like.device) for name, value in values.items()}


class CompiledRule:
    """One element-wise rule, compiled on first call per variant; ``__call__`` returns False (nothing written)
    when compiling is unavailable, and the caller runs its eager rule instead.

    The rule takes lists of tensors (one chunk of at most :data:`CHUNK` tensors a call: a call's fixed cost,
    guards and wrappers, is shared by the chunk) and per-tensor 0-d scalars in lists. A variant is what
    torch.compile would otherwise recompile for: the dtype, the thread count, the list lengths, which arguments
    are None and the values of the non-tensor arguments. Each gets its own copy of the function (its own code
    object, so its own compile cache entry): one compile each, and no recompile limit reached however many
    variants a process uses. Tensors are passed flattened (one rank for every shape).
    """

    def __init__(self, fn: Callable[..., None], *, contract: bool = False) -> None:
        self.fn = fn
        self.options = {"cpp.enable_floating_point_contract_flag": "fast" if contract else "off"}
        self._variants: dict[tuple[Any, ...], Callable[..., None]] = {}

    def _variant(self, key: tuple[Any, ...]) -> Callable[..., None]:
        compiled = self._variants.get(key)
        if compiled is None:
            code = self.fn.__code__.replace(co_name=f"{self.fn.__name__}_v{len(self._variants)}")
            copy = types.FunctionType(code, self.fn.__globals__, code.co_name, self.fn.__defaults__,
                                      self.fn.__closure__)
            copy.__kwdefaults__ = self.fn.__kwdefaults__
            compiled = torch.compile(copy, dynamic=True, fullgraph=True, options=self.options)
            self._variants[key] = compiled
        return compiled

    def __call__(self, *args: list[Tensor] | Tensor | None, **options: bool) -> bool:
        global _failed
        if _failed:
            return False
        flat = [[t.view(-1) for t in a] if isinstance(a, list) else a for a in args]
        like = args[0][0] if isinstance(args[0], list) else args[0]
        shape = tuple(len(a) if isinstance(a, list) else a is None for a in args)
        key = (like.dtype, torch.get_num_threads(), shape, tuple(sorted(options.items())))
        try:
            self._variant(key)(*flat, **options)
        except Exception as error:  # noqa: BLE001 -- any compile failure: fall back to the eager rules
            _failed = True
            warnings.warn(f"lightning_optkit: compiling {self.fn.__name__} failed ({type(error).__name__}: "
                          f"{error}); the eager rules run instead (set {ENV}=0 to skip compiling)",
                          RuntimeWarning, stacklevel=2)
            return False
        return True


def select(skip: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    """``old`` where the 0-d ``skip`` is true, else ``new`` (inside a compiled rule: a select in registers)."""
    return new if skip is None else torch.where(skip, old, new)


def rounded(skip: Tensor, t: Tensor) -> Tensor:
    """``t`` (zeroed on a skipped step, whose results are discarded anyway), as a value the compiler must round
    and keep: a select between a product and the add it feeds stops ``contract=True`` from fusing them into an
    FMA, where eager torch rounds the product first."""
    return torch.where(skip, torch.zeros_like(t), t)


def modifiers(scale: Tensor | None, skip: Tensor | None, like: Tensor) -> tuple[Tensor | None, Tensor]:
    """The pending grad scale in ``like``'s dtype (None: none) and the skip flag as a 0-d bool (False: none)."""
    scale = None if scale is None else scale.to(device=like.device, dtype=like.dtype)
    flag = torch.zeros((), dtype=torch.bool, device=like.device) if skip is None else skip.to(like.device)
    return scale, flag


def scaled_grad(grad: Tensor, scale: Tensor | None) -> Tensor:
    """The gradient times the pending scale, written back to ``grad`` as the eager path does in place."""
    if scale is None:
        return grad
    scaled = grad * scale
    grad.copy_(scaled)
    return scaled
