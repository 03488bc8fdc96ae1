"""The contract between step-deciding callbacks and kit optimizers.

A callback (GradientClipping, NonFiniteGuard) decides, in ``on_before_optimizer_step``, a gradient
scale (the clip coefficient) and a skip flag, both as device tensors. An optimizer that mixes in
:class:`StepModifiers` accepts them with :meth:`defer_grad_scale` / :meth:`defer_skip` and applies
them inside its next ``step()`` with no host sync: the gradients are scaled (inside the update on the
fused paths, by one in-place multiply on the foreach path), and when the skip flag is true the step
leaves parameters, state and the step counter exactly as they were.
Other optimizers get the scale applied with foreach ops by the callback itself.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class AcceptsStepModifiers(Protocol):
    """An optimizer that applies a deferred gradient scale and skip flag inside its step."""

    def defer_grad_scale(self, scale: torch.Tensor) -> None:
        """Multiply the gradients by the 0-d device tensor ``scale`` in the next step."""

    def defer_skip(self, flag: torch.Tensor) -> None:
        """Skip the next step when the 0-d device tensor ``flag`` is true."""


@functools.cache
def _class_accepts(cls: type) -> bool:
    return all(callable(getattr(cls, name, None)) for name in ("defer_grad_scale", "defer_skip"))


def accepts_step_modifiers(optimizer: Any) -> bool:
    """``isinstance(optimizer, AcceptsStepModifiers)``, decided once per class (runtime protocol checks cost
    microseconds each, and the callbacks ask on every optimizer step)."""
    return _class_accepts(type(optimizer))


class StepModifiers:
    """Mixin storing the pending scale and skip flag until the next ``step()`` pops them.

    Several callbacks compose: scales multiply, skip flags are OR-ed. All on device.
    """

    _pending_scale: torch.Tensor | None = None
    _pending_skip: torch.Tensor | None = None

    def defer_grad_scale(self, scale: torch.Tensor) -> None:
        """Multiply every gradient by ``scale`` (a 0-d device tensor) in the next step.

        Kept in float64 when given in float64 (a float64 run's clip coefficient), else float32.
        """
        scale = scale.detach().reshape(())
        scale = scale if scale.dtype == torch.float64 else scale.float()
        prev = self._pending_scale
        self._pending_scale = scale if prev is None else prev * scale

    def defer_skip(self, flag: torch.Tensor) -> None:
        """Skip the next step entirely when ``flag`` (a 0-d device tensor) is true."""
        flag = flag.detach().reshape(()).to(torch.bool)
        prev = self._pending_skip
        self._pending_skip = flag if prev is None else prev | flag

    def pop_step_modifiers(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return and clear ``(scale, skip)``; either may be None."""
        scale, skip = self._pending_scale, self._pending_skip
        self._pending_scale = None
        self._pending_skip = None
        return scale, skip
