"""SpecSet: every form of spec normalises once into the record plan, build and the mixin read."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lightning_optkit import OptimizerSpec, plan
from lightning_optkit.errors import SpecError
from lightning_optkit.spec import ChainSpec
from lightning_optkit.spec_set import SpecSet, normalise_spec

ADAMW = {"optimizer": "adamw", "lr": 1e-3}
SGD = {"optimizer": "sgd", "lr": 0.1, "params": "head.*"}


def test_each_form_normalises_to_its_kind_members_and_schedules() -> None:
    single = normalise_spec({"optim": {**ADAMW, "schedule": {"name": "cosine", "total": 10}}})
    assert (single.kind, single.field, single.manual) == ("single", "spec", False)
    assert [m.optimizer for m in single.members] == ["adamw"]
    assert single.schedules[0].name == "cosine" and single.source is single.members[0]

    chain = normalise_spec({"chain": [ADAMW, SGD], "schedule": {"name": "linear", "total": 5}, "name": "hybrid"})
    assert (chain.kind, chain.field, chain.manual) == ("chain", "chain", False)
    assert [m.optimizer for m in chain.members] == ["adamw", "sgd"]
    assert len(chain.schedules) == 1 and chain.schedules[0].name == "linear"  # one schedule drives the chain
    assert isinstance(chain.source, ChainSpec) and chain.per_optimizer == (chain.chain,)

    several = normalise_spec([{**ADAMW, "params": "body.*"}, SGD])
    assert (several.kind, several.field, several.manual) == ("list", "optimizers", True)
    assert several.schedules == (None, None) and isinstance(several.source, list)
    assert normalise_spec(several) is several  # already normalised: taken as is

    one_item_list = normalise_spec([ADAMW])
    assert one_item_list.kind == "single"  # a list of one spec trains as that spec


def test_a_spec_set_is_frozen() -> None:
    specs = normalise_spec(ADAMW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        specs.kind = "list"  # type: ignore[misc]


@pytest.mark.parametrize("bad, field", [
    ([{"chain": [ADAMW, SGD]}, ADAMW], "optimizers[0]"),
    ([ADAMW, [ADAMW, SGD]], "optimizers[1]"),
])
def test_a_chain_or_a_nested_list_inside_a_list_is_refused_naming_the_item(bad, field) -> None:
    with pytest.raises(SpecError) as err:
        normalise_spec(bad)
    assert err.value.field == field
    assert "flatten" in str(err.value) or "chain" in str(err.value)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def test_plan_is_a_record_of_rows_optimizers_and_the_spec_set_it_was_made_from() -> None:
    torch.manual_seed(0)
    model = Net()
    result = plan(model, {"chain": [{**ADAMW, "params": "body.*"}, SGD]})
    assert isinstance(result.specs, SpecSet) and result.specs.kind == "chain"
    assert [op.label for op in result.optimizers] == ["AdamW", "SGD"]
    assert [row.param for row in result] == [n for n, _ in model.named_parameters()]  # model order
    assert len(result) == 4 and result[0] is result.rows[0] and list(result[1:3]) == list(result.rows[1:3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.rows = ()  # type: ignore[misc]


def test_plan_accepts_the_spec_set_and_the_spec_alike() -> None:
    model = Net()
    spec = OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1)
    assert plan(model, normalise_spec(spec)).rows == plan(model, spec).rows
