"""One optimizer made of several: the hybrid-Muon pattern under one LR schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_optkit.errors import SpecError
from lightning_optkit.optim.core import run_closure


class _ChainedState(MutableMapping):
    """``optimizer.state`` of a chain: reads and writes go to the member that owns the parameter."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers
        self._owners = {
            id(p): optimizer for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]
        }

    def _owner(self, param: Tensor) -> torch.optim.Optimizer:
        owner = self._owners.get(id(param))
        if owner is None:
            raise KeyError(param)
        return owner

    def __getitem__(self, param: Tensor) -> Any:
        return self._owner(param).state[param]

    def __setitem__(self, param: Tensor, value: Any) -> None:
        self._owner(param).state[param] = value

    def __delitem__(self, param: Tensor) -> None:
        del self._owner(param).state[param]

    def __iter__(self) -> Iterator[Tensor]:
        for optimizer in self._optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._optimizers)


class ChainedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, driven as one ``torch.optim.Optimizer``.

    ``param_groups`` is the concatenation of the members' groups (the same dict objects), so an LR
    scheduler built on the chain drives every member. ``step(closure)`` runs the closure once (with
    grad enabled) and then steps every member in order; ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` cover all members. Typical use: ``torch.optim.Muon`` for 2-D hidden weight
    matrices and ``torch.optim.AdamW`` for everything else, with one schedule. (torch 2.13's Muon
    raises ValueError for any parameter that is not 2-D and has no complex support; its defaults are
    lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn=None.)

    The chain does not accept deferred step modifiers itself: clipping callbacks scale its members'
    gradients directly. Members that are kit optimizers still accept them individually.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        members = list(optimizers)
        if not members:
            raise SpecError("optimizers", optimizers, "pass at least one optimizer", problem="is empty")
        seen: set[int] = set()
        for i, optimizer in enumerate(members):
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise SpecError(f"optimizers[{i}]", optimizer, "pass torch.optim.Optimizer instances",
                                problem="is not a torch.optim.Optimizer")
            if isinstance(optimizer, ChainedOptimizer):
                raise SpecError(f"optimizers[{i}]", optimizer, "pass its members instead",
                                problem="is itself a ChainedOptimizer")
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise SpecError(f"optimizers[{i}]", type(optimizer).__name__,
                                        "give every parameter to exactly one member optimizer",
                                        problem=f"shares a parameter of shape {tuple(p.shape)} with an earlier member")
                    seen.add(id(p))
        # Optimizer.__init__ sets up torch's hook registries and step patching; it insists on a
        # parameter, so it gets a placeholder that add_param_group drops (the chain owns no groups).
        super().__init__([torch.zeros(0, requires_grad=True)], {})
        self.optimizers = members

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The members' param groups, concatenated (the same dict objects)."""
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        # Optimizer.__init__ assigns a list of its own; the chain keeps none.
        pass

    @property
    def state(self) -> _ChainedState:  # type: ignore[override]
        """Per-parameter state of all members, read and written through to the owning member."""
        return _ChainedState(self.optimizers)

    @state.setter
    def state(self, value: Any) -> None:
        pass

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported on the chain itself: add the group to one of ``optimizers``."""
        if "optimizers" not in self.__dict__:
            return  # the placeholder group from Optimizer.__init__
        raise TypeError("ChainedOptimizer.add_param_group: add the group to one of chain.optimizers instead")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure once (grad enabled), then step every member; return the closure's loss."""
        loss = run_closure(closure)
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every member's parameters."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """``{"members": [member.state_dict(), ...]}``, each in torch's format."""
        return {"members": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned into each member, in order."""
        members = state_dict.get("members") if isinstance(state_dict, dict) else None
        if not isinstance(members, list) or len(members) != len(self.optimizers):
            found = len(members) if isinstance(members, list) else "no"
            raise ValueError(
                f"ChainedOptimizer.load_state_dict expects {{'members': [...]}} with {len(self.optimizers)} "
                f"entries, got {found} entries; load a state_dict saved from a chain with the same members"
            )
        for optimizer, member_state in zip(self.optimizers, members):
            optimizer.load_state_dict(member_state)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(optimizer).replace("\n", "\n  ") for optimizer in self.optimizers)
        return f"ChainedOptimizer(\n  {inner}\n)"
