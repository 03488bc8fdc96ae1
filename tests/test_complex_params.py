"""Complex parameters: FusedAdamW refuses them at construction, build_optimizers names them before training,
and the documented route (torch's AdamW for the complex parameter in a chain) trains as torch's AdamW does."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit import OptimizerMixin, SpecError
from lightning_optkit.optim import FusedAdamW


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fused_adamw_refuses_a_complex_parameter_at_construction(backend):
    real = nn.Parameter(torch.randn(4))
    cplx = nn.Parameter(torch.randn(2, 3, dtype=torch.complex64))
    with pytest.raises(SpecError, match=r"parameter 1: torch.complex64, shape \(2, 3\).*complex parameter") as err:
        FusedAdamW([real, cplx], backend=backend)
    assert "adamw" in err.value.fix and "view_as_real" in err.value.fix
    optimizer = FusedAdamW([real], backend=backend)
    with pytest.raises(SpecError, match="param group 1, parameter 0"):
        optimizer.add_param_group({"params": [cplx]})
    assert len(optimizer.param_groups) == 1  # the refused group is not left behind


class Filter(OptimizerMixin, L.LightningModule):
    """A learnable complex frequency response on the FFT of the input, then a real linear head."""

    def __init__(self, optim: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.response = nn.Parameter(torch.ones(5, dtype=torch.complex64))
        self.head = nn.Linear(8, 1)
        self.batches = 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        x, y = batch
        filtered = torch.fft.irfft(torch.fft.rfft(x) * self.response, n=8)
        return nn.functional.mse_loss(self.head(filtered).squeeze(-1), y)


def _fit(model: Filter, data: DataLoader, quiet_trainer_kwargs) -> Filter:
    L.Trainer(**quiet_trainer_kwargs, max_steps=3).fit(model, data)
    return model


def test_fit_with_fused_adamw_on_a_complex_parameter_fails_before_the_first_batch(quiet_trainer_kwargs):
    data = DataLoader(TensorDataset(torch.randn(12, 8), torch.randn(12)), batch_size=4)
    model = Filter({"optimizer": "fused_adamw", "lr": 1e-2})
    with pytest.raises(SpecError, match="params='response' is a complex parameter.*FusedAdamW cannot train"):
        _fit(model, data, quiet_trainer_kwargs)
    assert model.batches == 0


def test_complex_parameter_in_an_adamw_chain_member_trains_as_torch_adamw(gen, quiet_trainer_kwargs):
    data = DataLoader(TensorDataset(torch.randn(12, 8, generator=gen), torch.randn(12, generator=gen)), batch_size=4)
    chain = {"chain": [{"optimizer": "adamw", "lr": 1e-2, "params": "response"},
                       {"optimizer": "fused_adamw", "lr": 1e-2, "backend": "torch"}]}
    reference = Filter({"optimizer": "adamw", "lr": 1e-2})
    model = Filter(chain)
    model.load_state_dict(copy.deepcopy(reference.state_dict()))
    _fit(reference, data, quiet_trainer_kwargs)
    _fit(model, data, quiet_trainer_kwargs)
    assert not torch.equal(model.response.detach(), torch.ones(5, dtype=torch.complex64))  # it trained
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        # torch's fused CPU kernel (FusedAdamW) vs its foreach AdamW: float32 rounding only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
