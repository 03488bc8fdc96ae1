"""SpecSet: a spec normalised once, the one input of plan, build and the mixin.

A user gives one OptimizerSpec, a ChainSpec (several optimizers stepped as one), a list of specs (one
Lightning optimizer each, manual optimization), or the dict/YAML data of any of those. Which of the
three it is decides how parameters are partitioned, how many Lightning optimizers and schedules
there are and which callbacks the mixin adds; :func:`normalise_spec` decides it once, and every
consumer reads the answer from the frozen :class:`SpecSet` instead of re-testing the spec's type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lightning_optkit.errors import SpecError
from lightning_optkit.spec import ChainSpec, OptimizerSpec, spec_from_data

SpecKind = Literal["single", "chain", "list"]


@dataclass(frozen=True)
class SpecSet:
    """The optimizer specs of one training setup and how they train together.

    ``kind``: ``"single"`` (one optimizer), ``"chain"`` (the members stepped together as one Lightning
    optimizer under the chain's one schedule) or ``"list"`` (one Lightning optimizer per member, each
    with its own schedule; Lightning requires manual optimization). ``members`` are the optimizer specs
    in order; they partition the parameters whatever the kind. ``chain`` is the ChainSpec for a chain.
    """

    kind: SpecKind
    members: tuple[OptimizerSpec, ...]
    chain: ChainSpec | None = None

    @property
    def source(self) -> OptimizerSpec | ChainSpec | list[OptimizerSpec]:
        """The spec in the form :func:`~lightning_optkit.spec.spec_from_data` returns."""
        if self.chain is not None:
            return self.chain
        return list(self.members) if self.kind == "list" else self.members[0]

    @property
    def field(self) -> str:
        """The spec field that holds the members, as SpecErrors about a member name it."""
        return {"single": "spec", "chain": "chain", "list": "optimizers"}[self.kind]

    @property
    def manual(self) -> bool:
        """Whether Lightning must run manual optimization (several Lightning optimizers)."""
        return self.kind == "list"

    @property
    def per_optimizer(self) -> tuple[OptimizerSpec | ChainSpec, ...]:
        """What each Lightning optimizer is built from: the chain, or each member."""
        return (self.chain,) if self.chain is not None else self.members

    @property
    def schedules(self) -> tuple[Any, ...]:
        """The schedule of each Lightning optimizer (None where it has none): one for a chain."""
        return tuple(spec.schedule for spec in self.per_optimizer)


def _validate_list_members(specs: list[Any]) -> tuple[OptimizerSpec, ...]:
    for i, member in enumerate(specs):
        if isinstance(member, ChainSpec):
            raise SpecError(f"optimizers[{i}]", member.to_dict(), "give the chain as the whole spec, or list "
                            "its members as separate optimizers", problem="is a chain inside a list of optimizers")
        if isinstance(member, list):
            raise SpecError(f"optimizers[{i}]", [m.to_dict() for m in member], "flatten the list: one spec "
                            "per optimizer", problem="is a nested list")
    return tuple(specs)


def normalise_spec(data: Any) -> SpecSet:
    """Normalise anything the mixin accepts (a spec, a SpecSet, their dict/YAML data) into a SpecSet."""
    if isinstance(data, SpecSet):
        return data
    spec = spec_from_data(data)
    if isinstance(spec, ChainSpec):
        return SpecSet("chain", tuple(spec.specs), spec)
    if isinstance(spec, list):
        return SpecSet("list", _validate_list_members(spec))
    return SpecSet("single", (spec,))
