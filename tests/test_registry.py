"""The registry: one record per optimizer name, whose capabilities decide what build and the mixin do."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from test_sharded_strategies import trainer_with
from torch import nn

from lightning_optkit import OptimizerMixin, OptimizerSpec, build_optimizers, list_optimizers
from lightning_optkit.callbacks.schedulefree import ScheduleFreeMode
from lightning_optkit.errors import SpecError
from lightning_optkit.optim import LAMB, FusedAdamW, ScheduleFreeAdamW
from lightning_optkit.registry import OptimizerInfo, optimizer_info, register_optimizer, resolve_optimizer


def test_every_name_has_a_frozen_record_naming_its_class_and_capabilities() -> None:
    for name in list_optimizers():
        info = optimizer_info(name)
        assert info.name == name and info.cls is resolve_optimizer(name)
        assert isinstance(info.description, str)
        with pytest.raises(dataclasses.FrozenInstanceError):
            info.whole_matrix = True  # type: ignore[misc]
    assert optimizer_info("lamb").whole_tensor_norms and optimizer_info("fused_adamw").whole_tensor_norms
    assert optimizer_info("schedulefree_adamw").train_eval_modes
    assert not any(optimizer_info(n).whole_tensor_norms for n in ("adamw", "lion", "adan", "momentum_sgd"))
    if hasattr(torch.optim, "Muon"):
        assert optimizer_info("muon").whole_matrix


def test_a_class_gets_the_record_of_its_nearest_registered_base() -> None:
    class MyLamb(LAMB):
        pass

    assert optimizer_info(MyLamb) is optimizer_info(LAMB) and optimizer_info(FusedAdamW).name == "fused_adamw"
    assert optimizer_info(ScheduleFreeAdamW).train_eval_modes

    class Plain(torch.optim.Optimizer):
        """A user optimizer the registry does not know."""

    assert optimizer_info(Plain) == OptimizerInfo("plain", Plain, "A user optimizer the registry does not know.")


def test_a_path_entry_is_listed_only_when_its_package_is_installed() -> None:
    info = optimizer_info("bnb_adamw8bit")
    assert info.target == "bitsandbytes.optim:AdamW8bit"
    assert ("bnb_adamw8bit" in list_optimizers()) == info.available
    assert "bnb_adamw8bit" in list_optimizers(include_unavailable=True)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)


@pytest.fixture
def whole_norm_optimizer():
    """A user optimizer registered with whole_tensor_norms, removed again afterwards."""
    from lightning_optkit import registry

    @register_optimizer("test_trust_sgd", whole_tensor_norms=True, description="SGD with a trust ratio")
    class TrustSGD(torch.optim.SGD):
        pass

    yield TrustSGD
    registry._OPTIMIZERS.pop("test_trust_sgd")


def test_a_user_registration_declares_capabilities_that_build_acts_on(whole_norm_optimizer, monkeypatch) -> None:
    info = optimizer_info("test_trust_sgd")
    assert (info.cls, info.description, info.whole_tensor_norms) == (whole_norm_optimizer, "SGD with a trust ratio",
                                                                       True)
    trainer = trainer_with("FSDPStrategy", monkeypatch)
    with pytest.raises(SpecError, match="computes norms across whole tensors"):
        build_optimizers(Net(), OptimizerSpec("test_trust_sgd", lr=0.1), trainer=trainer)
    plain = build_optimizers(Net(), OptimizerSpec("sgd", lr=0.1), trainer=trainer)  # element-wise: builds
    assert isinstance(plain, torch.optim.SGD)


def test_registering_another_class_under_a_taken_name_needs_overwrite() -> None:
    class Other(torch.optim.SGD):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("lamb")(Other)
    assert optimizer_info("lamb").cls is LAMB


class TrainEvalModel(OptimizerMixin, pl.LightningModule):
    def __init__(self, optimizer_cls: type) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.optim_spec = OptimizerSpec(optimizer_cls, lr=0.01)


def test_the_mixin_adds_schedule_free_mode_for_any_optimizer_declaring_train_eval_modes() -> None:
    class MyScheduleFree(ScheduleFreeAdamW):
        pass

    added = TrainEvalModel(MyScheduleFree).configure_callbacks()
    assert [type(c) for c in added] == [ScheduleFreeMode]
    assert TrainEvalModel(torch.optim.AdamW).configure_callbacks() == []
