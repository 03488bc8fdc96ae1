"""The one optimizer base of the kit: the step every kit optimizer shares, around a per-group update.

:class:`StepOptimizer` supplies ``step(closure=None)``:

1. :meth:`~StepOptimizer._check_ready` (a subclass may refuse to step now, e.g. ScheduleFreeAdamW in eval mode);
2. the closure runs under ``torch.enable_grad()`` (:func:`run_closure`) and its loss is returned;
3. each group's parameters with a gradient are gathered (sparse gradients raise);
4. :meth:`~StepOptimizer._decide` makes the step's one gradient scale and skip flag (0-d device tensors or
   None) for all groups: by default the pending :class:`~lightning_optkit.optim.modifiers.StepModifiers`;
   FusedAdamW adds its in-step global-norm clip and GradScaler's inputs;
5. :meth:`~StepOptimizer.update_group` runs for each group: the public per-group update, which creates
   missing state itself (:meth:`~StepOptimizer._state_of`), so that a caller outside ``step`` (the DDP
   overlap hook) updates exactly as ``step`` does;
6. :meth:`~StepOptimizer.finish_step` closes the step (per-step bookkeeping after every group; FusedAdamW
   advances its stochastic-rounding seeds). A caller of ``update_group`` calls it once per step.

Subclasses: :class:`~lightning_optkit.optim.base.KitOptimizer` (an update rule over lists of tensors, run
foreach, per parameter or by a fused kernel) and :class:`~lightning_optkit.optim.fused_adamw.FusedAdamW`.

Pickling: torch's ``Optimizer.__getstate__`` keeps only defaults, state and param groups; the instance
attributes a subclass names in ``pickled_attributes`` travel with them, so a deepcopy or an unpickled
optimizer keeps its settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_optkit.optim.modifiers import StepModifiers

#: One group's parameters with a gradient, and those gradients.
Batch = tuple[dict[str, Any], list[Tensor], list[Tensor]]


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """The closure's loss (computed with grad enabled, also inside ``torch.no_grad``), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class StepOptimizer(StepModifiers, torch.optim.Optimizer):
    """A torch optimizer whose step is: closure, gather, one scale/skip decision, a per-group update."""

    #: Instance attributes that a deepcopy or pickle carries besides torch's state (see the module doc).
    pickled_attributes: ClassVar[tuple[str, ...]] = ()
    #: Read by build_optimizers, which names a complex parameter of the model before constructing this.
    supports_complex: ClassVar[bool] = False

    # ----------------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, then :meth:`_validate_group`; a refused group is not added."""
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except (ValueError, NotImplementedError):
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise (ValueError / SpecError, NotImplementedError) for a group this optimizer cannot train."""

    # ------------------------------------------------------------------------------------------ state
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Fresh per-parameter state tensors for ``p`` (no step counters)."""
        return {}

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """The whole state a parameter starts with: :meth:`_init_state` and any counters."""
        return self._init_state(p, group)

    def _state_of(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """``p``'s state, created on first use (lazily, as torch's optimizers do)."""
        state = self.state[p]
        if not state:
            state.update(self._new_state(p, group))
        return state

    def __getstate__(self) -> dict[str, Any]:
        """torch's state (defaults, state, param_groups) plus ``pickled_attributes``."""
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in self.pickled_attributes if key in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's ``__setstate__``; ``pickled_attributes`` in ``state`` are set, the others keep their values
        (torch's ``load_state_dict`` calls this with only state and param groups)."""
        state = dict(state)
        extra = {key: state.pop(key) for key in self.pickled_attributes if key in state}
        super().__setstate__(state)
        self.__dict__.update(extra)

    # ------------------------------------------------------------------------------------------- step
    def _check_ready(self) -> None:
        """Raise when the optimizer cannot step now (hook for subclasses; called before the closure)."""

    def _gather(self, group: dict[str, Any], group_index: int) -> tuple[list[Tensor], list[Tensor]]:
        """The group's parameters that have a gradient, and those gradients; a sparse gradient raises."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for i, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter {i} of param group "
                    f"{group_index}); use torch.optim.SparseAdam for it, or nn.Embedding(sparse=False)"
                )
            params.append(p)
            grads.append(grad)
        return params, grads

    def _decide(self, batches: list[Batch]) -> tuple[Tensor | None, Tensor | None]:
        """The step's gradient scale and skip flag for every group: the pending step modifiers (popped)."""
        return self.pop_step_modifiers()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure (with grad enabled) if given, update every parameter, return the loss."""
        self._check_ready()
        loss = run_closure(closure)
        batches = []
        for index, group in enumerate(self.param_groups):
            params, grads = self._gather(group, index)
            if params:
                batches.append((group, params, grads))
        scale, skip = self._decide(batches)
        if not batches:
            return loss
        for group, params, grads in batches:
            self.update_group(group, params, grads, grad_scale=scale, skip=skip)
        self.finish_step()
        return loss

    def update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], *,
                     grad_scale: Tensor | None = None, skip: Tensor | None = None) -> None:
        """Update ``params`` (parameters of ``group`` that have a gradient) from ``grads``, in place.

        ``grad_scale`` multiplies the gradients and a true ``skip`` leaves parameters, state and counters
        untouched (both 0-d device tensors or None; no host sync). Missing state is created first.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement update_group")

    def finish_step(self) -> None:
        """Close a step after every group's :meth:`update_group` (a no-op unless a subclass keeps per-step
        state outside its param groups)."""
