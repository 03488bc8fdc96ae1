"""The kit optimizer base: validation, closure semantics, errors, step modifiers and the fused hook."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

import lightning_optkit.kernels as kernels
from lightning_optkit.errors import SpecError
from lightning_optkit.optim.adan import Adan
from lightning_optkit.optim.base import restore_if
from lightning_optkit.optim.lamb import LAMB
from lightning_optkit.optim.lion import Lion
from lightning_optkit.optim.modifiers import AcceptsStepModifiers
from lightning_optkit.optim.momentum_sgd import MomentumSGD
from lightning_optkit.optim.schedulefree import ScheduleFreeAdamW
from lightning_optkit.registry import resolve_optimizer

ALL = [
    (MomentumSGD, dict(lr=0.05, nesterov=True, weight_decay=0.01)),
    (Lion, dict(lr=1e-2, weight_decay=0.1)),
    (LAMB, dict(lr=1e-2)),
    (Adan, dict(lr=1e-2, weight_decay=0.02)),
    (ScheduleFreeAdamW, dict(lr=1e-2, warmup_steps=3, weight_decay=0.01)),
]
IDS = [cls.__name__ for cls, _ in ALL]


def make_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s)) for s in [(4, 5), (5,), (3, 2, 2)]]


def set_grads(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def snapshot(params, optimizer) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def assert_same(params, optimizer, snap) -> None:
    old_params, old_state = snap
    for p, old in zip(params, old_params):
        assert torch.equal(p, old)
    new_state = optimizer.state_dict()
    assert new_state["param_groups"] == old_state["param_groups"]
    assert new_state["state"].keys() == old_state["state"].keys()
    for index, entry in old_state["state"].items():
        for key, value in entry.items():
            assert torch.equal(new_state["state"][index][key], value), (index, key)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("momentum_sgd", MomentumSGD), ("lion", Lion), ("lamb", LAMB), ("adan", Adan),
     ("schedulefree_adamw", ScheduleFreeAdamW)],
)
def test_registered_under_its_name(name: str, cls: type) -> None:
    assert resolve_optimizer(name) is cls
    assert issubclass(cls, AcceptsStepModifiers) and issubclass(cls, torch.optim.Optimizer)


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (MomentumSGD, dict(lr=-0.1), "lr"),
        (MomentumSGD, dict(weight_decay=-1e-4), "weight_decay"),
        (MomentumSGD, dict(momentum=0.0, nesterov=True), "nesterov"),
        (Lion, dict(betas=(0.9, 1.0)), "betas[1]"),
        (Lion, dict(lr=float("nan")), "lr"),
        (LAMB, dict(eps=-1e-6), "eps"),
        (LAMB, dict(max_trust_ratio=0.0), "max_trust_ratio"),
        (Adan, dict(betas=(0.9, 0.9)), "betas"),
        (Adan, dict(betas=(-0.1, 0.9, 0.9)), "betas[0]"),
        (ScheduleFreeAdamW, dict(betas=(0.0, 0.999)), "betas[0]"),  # beta1 = 0 names the item
        (ScheduleFreeAdamW, dict(warmup_steps=2.5), "warmup_steps"),
    ],
)
def test_invalid_hyperparameter_names_field_and_value(cls, kwargs, field) -> None:
    with pytest.raises(ValueError) as info:
        cls(make_params(), **kwargs)
    message = str(info.value)
    assert message.startswith(f"{field}=")
    assert "Fix:" in message
    assert isinstance(info.value, SpecError) and info.value.field == field


def test_param_group_overrides_are_validated_too() -> None:
    a, b = make_params()[:2]
    with pytest.raises(SpecError, match=r"lr=-1"):
        Lion([{"params": [a]}, {"params": [b], "lr": -1}])
    optimizer = Lion([a])
    with pytest.raises(SpecError, match=r"weight_decay=-0.5"):
        optimizer.add_param_group({"params": [b], "weight_decay": -0.5})
    assert len(optimizer.param_groups) == 1  # the rejected group was not kept


@pytest.mark.parametrize(("cls", "kwargs"), ALL, ids=IDS)
def test_complex_parameters_rejected_at_construction(cls, kwargs) -> None:
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(SpecError, match="complex parameter.*view_as_real"):
        cls([z], **kwargs)


@pytest.mark.parametrize(("cls", "kwargs"), ALL, ids=IDS)
def test_sparse_gradients_raise_clearly(cls, kwargs) -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = cls(embedding.parameters(), **kwargs)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients.*SparseAdam"):
        optimizer.step()


@pytest.mark.parametrize(("cls", "kwargs"), ALL, ids=IDS)
def test_closure_runs_with_grad_enabled_and_its_loss_is_returned(cls, kwargs) -> None:
    model = torch.nn.Linear(4, 1)
    optimizer = cls(model.parameters(), **kwargs)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    before = model.weight.detach().clone()
    calls = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # fails unless step() re-enables grad
        calls.append(loss)
        return loss

    with torch.no_grad():
        returned = optimizer.step(closure)
    assert returned is calls[0] and len(calls) == 1
    assert not torch.equal(model.weight, before)
    assert optimizer.step() is None


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(("cls", "kwargs"), ALL, ids=IDS)
def test_pending_skip_leaves_everything_bit_identical(cls, kwargs, foreach) -> None:
    params = make_params()
    optimizer = cls(params, foreach=foreach, **kwargs)
    for _ in range(3):
        set_grads(params, [torch.randn_like(p) for p in params])
        optimizer.step()
    before = snapshot(params, optimizer)
    set_grads(params, [torch.randn_like(p) for p in params])
    optimizer.defer_skip(torch.tensor(False))
    optimizer.defer_skip(torch.tensor(True))  # flags are OR-ed
    optimizer.step()
    assert_same(params, optimizer, before)
    assert optimizer.pop_step_modifiers() == (None, None)


@pytest.mark.parametrize(("cls", "kwargs"), ALL, ids=IDS)
def test_false_skip_flag_and_grad_scale_act_like_prescaled_grads(cls, kwargs) -> None:
    params = make_params()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, plain = cls(params, **kwargs), cls(twin, **kwargs)
    for step in range(4):
        grads = [torch.randn_like(p) for p in params]
        set_grads(params, grads)
        scale = torch.tensor(0.25 + step)
        ours.defer_grad_scale(scale)
        ours.defer_skip(torch.tensor(False))
        set_grads(twin, [g * scale for g in grads])
        ours.step()
        plain.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g * scale)  # scaled in place: no gradient-sized copy
        for a, b in zip(params, twin):
            assert torch.equal(a, b)


@pytest.mark.parametrize(("cls", "kwargs"), ALL, ids=IDS)
def test_skip_with_nan_grads_restores_nan_and_signed_zero_bits(cls, kwargs) -> None:
    params = make_params()
    optimizer = cls(params, **kwargs)
    set_grads(params, [torch.randn_like(p) for p in params])
    optimizer.step()
    with torch.no_grad():
        params[0][0, 0] = -0.0
        params[1][0] = float("nan")
    state_before = copy.deepcopy(optimizer.state_dict()["state"])
    bits = [p.detach().view(torch.int32).clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    grads[0][1, 1] = float("nan")
    grads[2].fill_(float("inf"))
    set_grads(params, grads)
    optimizer.defer_skip(torch.tensor(True))
    optimizer.step()
    for p, b in zip(params, bits):
        assert torch.equal(p.detach().view(torch.int32), b)
    for index, entry in state_before.items():
        for key, value in entry.items():
            now = optimizer.state_dict()["state"][index][key]
            torch.testing.assert_close(now, value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["where-per-tensor", "multi-tensor-bits"])
@pytest.mark.parametrize("flag", [True, False])
def test_restore_if_selects_bit_patterns_exactly(per_tensor, flag) -> None:
    """Both select strategies (CPU's per-tensor where, the accelerator's integer foreach) are exact."""
    special = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -3.5]
    olds, news = [], []
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        olds += [torch.tensor(special, dtype=dtype), torch.randn(5, 3).to(dtype), torch.tensor(-0.0, dtype=dtype)]
        news += [torch.tensor(special[::-1], dtype=dtype), torch.randn(5, 3).to(dtype),
                 torch.tensor(float("nan"), dtype=dtype)]
    olds[0][0] = -float("nan")  # a NaN with the sign bit set: its payload must come back too
    tensors = [t.clone() for t in news]
    saved = [t.clone() for t in olds]
    restore_if(torch.tensor(flag), tensors, saved, per_tensor=per_tensor)
    for got, want in zip(tensors, olds if flag else news):
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
        assert torch.equal(got.view(bits), want.view(bits))


class _CountTorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _calls_per_step(optimizer, params, skip: bool | None) -> int:
    set_grads(params, [torch.randn_like(p) for p in params])
    if skip is not None:
        optimizer.defer_skip(torch.tensor(skip))
    with _CountTorchCalls() as counter:
        optimizer.step()
    return counter.calls


@pytest.mark.parametrize(("cls", "kwargs"), ALL, ids=IDS)
def test_guarded_foreach_step_adds_one_select_per_tensor_and_no_per_tensor_clones(cls, kwargs) -> None:
    """NonFiniteGuard defers a skip flag every step: its cost must stay one clone call + one select each."""
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(20)]
    optimizer = cls(params, **kwargs)
    _calls_per_step(optimizer, params, None)  # state exists now
    plain = _calls_per_step(optimizer, params, None)
    guarded = _calls_per_step(optimizer, params, False)
    written = len(params) * (1 + len(cls.state_names) + len(cls.scalar_state_names))
    assert guarded - plain <= written + 8


@pytest.mark.parametrize(("cls", "kwargs"), ALL, ids=IDS)
def test_step_with_pending_modifiers_never_syncs_to_host(cls, kwargs, monkeypatch) -> None:
    params = make_params()
    optimizer = cls(params, **kwargs)
    set_grads(params, [torch.randn_like(p) for p in params])
    optimizer.step()  # state exists now

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync inside optimizer.step()")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    set_grads(params, [torch.randn_like(p) for p in params])
    optimizer.defer_grad_scale(torch.tensor(0.5))
    optimizer.defer_skip(torch.tensor(True))
    optimizer.step()
    optimizer.defer_skip(torch.tensor(False))
    optimizer.step()
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="host sync"):  # the probe itself works
        monkeypatch.setattr(torch.Tensor, "item", host_sync)
        torch.tensor(1.0).item()


@pytest.mark.parametrize(("cls", "kernel"), [(MomentumSGD, kernels.momentum_sgd_fused_step),
                                             (Lion, kernels.lion_fused_step)], ids=["MomentumSGD", "Lion"])
def test_fused_without_kernel_raises_not_implemented(cls, kernel, monkeypatch) -> None:
    assert cls.fused_step is kernel  # the class holds the kernel itself, no name to look up
    cls(make_params(), fused=True)
    monkeypatch.setattr(cls, "fused_step", None)  # as in an installation without it
    with pytest.raises(NotImplementedError, match=r"fused kernel from lightning_optkit\.kernels.*fused=None"):
        cls(make_params(), fused=True)


def test_fused_hook_hands_the_group_to_the_kernel(monkeypatch) -> None:
    """A kernel written against the documented hook signature drives MomentumSGD like torch SGD."""

    def sgd_kernel(group, params, grads, state_lists, scale, skip):
        assert scale is None and skip is None
        bufs = state_lists["momentum_buffer"]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        torch._foreach_add_(params, bufs, alpha=-group["lr"])

    monkeypatch.setattr(MomentumSGD, "fused_step", staticmethod(sgd_kernel))
    params = make_params()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = MomentumSGD(params, lr=0.1, momentum=0.9, fused=True)
    theirs = torch.optim.SGD(twin, lr=0.1, momentum=0.9)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        set_grads(params, grads)
        set_grads(twin, grads)
        ours.step()
        theirs.step()
    for a, b in zip(params, twin):
        assert torch.equal(a, b)


def test_foreach_path_groups_by_device_and_dtype() -> None:
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(2, 2))]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, loop = Adan(params, foreach=True), Adan(twin, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        set_grads(params, grads)
        set_grads(twin, grads)
        ours.step()
        loop.step()
    for a, b in zip(params, twin):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_schedulefree_refuses_to_step_in_eval_mode() -> None:
    params = make_params()
    optimizer = ScheduleFreeAdamW(params)
    for _ in range(3):  # after one step x = y = z (the first average weight is 1)
        set_grads(params, [torch.randn_like(p) for p in params])
        optimizer.step()
    y = [p.detach().clone() for p in params]
    optimizer.eval()
    assert not optimizer.train_mode
    assert any(not torch.equal(p, old) for p, old in zip(params, y))
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer.train\(\)"):
        optimizer.step()
    optimizer.train()
    for p, old in zip(params, y):
        torch.testing.assert_close(p, old, rtol=1e-6, atol=1e-6)  # y recovered (lerp round trip)


@pytest.mark.parametrize(("cls", "kwargs"), [
    (MomentumSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (Lion, dict(lr=1e-2, weight_decay=0.1)),
], ids=["MomentumSGD", "Lion"])
def test_fused_kernel_matches_the_foreach_path(cls, kwargs) -> None:
    """With lightning_optkit.kernels wired in, fused=True follows the same rule (scale and skip too)."""
    assert cls.fused_step is not None
    params = make_params()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused, foreach = cls(params, fused=True, **kwargs), cls(twin, **kwargs)
    for step in range(6):
        grads = [torch.randn_like(p) for p in params]
        for opt, ps in ((fused, params), (foreach, twin)):
            set_grads(ps, grads)
            opt.defer_grad_scale(torch.tensor(0.5))
            opt.defer_skip(torch.tensor(step == 3))
            opt.step()
        for a, b in zip(params, twin):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
