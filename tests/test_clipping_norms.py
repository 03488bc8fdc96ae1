"""lightning_optkit.norms against torch.nn.utils.get_total_norm and a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_optkit.norms import check_norm_type, params_by_module_prefix, tensor_norms, total_norm


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_total_norm_matches_float64_reference(p):
    tensors = [torch.randn(3, 5), torch.randn(7, dtype=torch.float64), torch.randn(4, 2).bfloat16(), torch.randn(1)]
    flat = torch.cat([t.double().flatten() for t in tensors])
    expected = torch.linalg.vector_norm(flat, p)
    got = total_norm(tensors, p)
    assert got.dtype == torch.float64 and got.ndim == 0  # one input is float64: so is the total
    assert total_norm([t.float() for t in tensors], p).dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.float(), torch.nn.utils.get_total_norm([t.float() for t in tensors], p),
                               rtol=1e-6, atol=0)
    for t, n in zip(tensors, tensor_norms(tensors, p), strict=True):
        torch.testing.assert_close(n.double(), torch.linalg.vector_norm(t.double(), p), rtol=1e-5, atol=0)


def test_nonfinite_propagates_and_empty_is_zero():
    assert torch.isnan(total_norm([torch.randn(3), torch.tensor([math.nan])]))
    assert torch.isinf(total_norm([torch.randn(3), torch.tensor([math.inf])], math.inf))
    assert total_norm([]).item() == 0.0


@pytest.mark.parametrize("bad", [0, -1.0, -math.inf, math.nan])
def test_bad_norm_type(bad):
    with pytest.raises(ValueError, match="norm_type"):
        check_norm_type(bad)


def test_params_by_module_prefix():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    model.add_module("head", nn.Linear(2, 1))
    one = params_by_module_prefix(model, depth=1)
    assert list(one) == ["encoder", "head"] and len(one["encoder"]) == 4
    two = params_by_module_prefix(model, depth=2)
    assert list(two) == ["encoder.0", "encoder.1", "head"]
    model.head.weight.grad = torch.ones_like(model.head.weight)
    assert params_by_module_prefix(model, only_with_grad=True) == {"head": [model.head.weight]}
    with pytest.raises(ValueError, match="depth"):
        params_by_module_prefix(model, depth=0)


def test_clip_coefficient_matches_float64_torch_formula_and_propagates_nan():
    from lightning_optkit.callbacks import clipping
    from lightning_optkit.norms import clip_coefficient

    assert clipping.clip_coefficient is clip_coefficient  # one implementation, the old import still works
    norms = torch.rand(64) * 4
    limit = 1.5
    expected = torch.clamp(limit / (norms.double() + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
    got = torch.stack([clip_coefficient(limit, n) for n in norms])
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    assert (got < 1).any() and (got == 1).any()
    # and bit-equal to torch's own float32 computation, so switching from Trainer(gradient_clip_val)
    # to GradientClipping does not change a run
    assert torch.equal(got, torch.stack([torch.clamp(limit / (n + 1e-6), max=1.0) for n in norms]))
    for bad in (math.inf, -math.inf, math.nan):
        assert torch.isnan(clip_coefficient(limit, torch.tensor(bad)))
        assert torch.isnan(clip_coefficient(torch.tensor(limit), torch.tensor(bad)))


def test_a_gradient_replaced_within_a_step_gets_its_own_norm():
    """The norms shared by the callbacks at one step are reused only for the very same gradients.

    A gradient replaced within a step (LBFGS re-running its closure: zero_grad, then backward) is a
    new tensor that often gets the freed one's address, so an id-keyed cache would hand back the
    old norm.
    """
    import lightning.pytorch as pl

    from lightning_optkit.callbacks.step_norms import step_grad_norms

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    p = torch.nn.Parameter(torch.randn(10))
    opt = torch.optim.SGD([p], lr=0.1)
    for scale in torch.rand(20).add(0.5).tolist():
        p.grad = torch.randn(10)
        _, (first,) = step_grad_norms(trainer, opt, 2.0)
        assert first.item() == pytest.approx(p.grad.norm().item(), rel=1e-6)
        p.grad = None
        p.grad = torch.randn(10).mul_(scale)  # same step (global_step unchanged), a new gradient
        _, (second,) = step_grad_norms(trainer, opt, 2.0)
        assert second.item() == pytest.approx(p.grad.norm().item(), rel=1e-6)
        again = step_grad_norms(trainer, opt, 2.0)[1][0]
        assert again is second  # the same gradient: the norm is shared, not recomputed


def test_a_parameter_listed_twice_counts_once():
    """torch only warns about a parameter repeated within a group; its gradient enters the norm once."""
    import warnings

    import lightning.pytorch as pl

    from lightning_optkit.callbacks.step_norms import step_grad_norms

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    p, q = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = torch.optim.SGD([p, q, p], lr=0.1)
    p.grad, q.grad = torch.randn(6), torch.randn(3)
    params, norms = step_grad_norms(trainer, opt, 2.0)
    assert params == [p, q]
    total = torch.linalg.vector_norm(torch.stack(norms))
    assert total.item() == pytest.approx(torch.nn.utils.get_total_norm([p.grad, q.grad]).item(), rel=1e-6)
