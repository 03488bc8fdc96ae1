"""Fused SGD-momentum against torch.optim.SGD and fused Lion against a float64 reference, both backends."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import use_backend

from lightning_optkit.kernels import (
    adamw_step,
    grad_sum_of_squares,
    lion_fused_step,
    lion_step,
    momentum_sgd_fused_step,
    sgd_momentum_step,
)

BACKENDS = ["torch", "triton"]
SHAPES = [(4100,), (3, 7), (1,), (64,)]
STEPS = 10
RTOL = 1e-6


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


SGD_CONFIGS = [
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, weight_decay=0.1),
    dict(lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True),
    dict(lr=0.05, momentum=0.5, maximize=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_momentum_step_follows_torch_sgd(config, backend, gen, monkeypatch):
    use_backend(backend, monkeypatch)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    ref = [p.clone().requires_grad_() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    ref_opt = torch.optim.SGD(ref, **config)
    for _ in range(STEPS):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        sgd_momentum_step(params, grads, bufs, backend=backend, **config)
        ref_opt.step()
    assert rel_err(flat(params), flat(ref)) <= RTOL
    assert rel_err(flat(bufs), flat(ref_opt.state[r]["momentum_buffer"] for r in ref)) <= RTOL


def lion_reference(p, g, m, *, lr, beta1, beta2, weight_decay):
    """The Lion rule in float64: returns the new (p, m)."""
    p, g, m = p.double(), g.double(), m.double()
    update = torch.sign(beta1 * m + (1 - beta1) * g)
    return p * (1 - lr * weight_decay) - lr * update, beta2 * m + (1 - beta2) * g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_step_follows_float64_reference(weight_decay, backend, gen, monkeypatch):
    use_backend(backend, monkeypatch)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=weight_decay)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    exp_avgs = [torch.zeros_like(p) for p in params]
    ref_p = [p.double() for p in params]
    ref_m = [m.double() for m in exp_avgs]
    for _ in range(STEPS):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        lion_step(params, grads, exp_avgs, backend=backend, **hp)
        for i, g in enumerate(grads):
            ref_p[i], ref_m[i] = lion_reference(ref_p[i], g, ref_m[i], **hp)
    assert rel_err(flat(params), flat(ref_p)) <= RTOL
    assert rel_err(flat(exp_avgs), flat(ref_m)) <= RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_multiplies_and_skip_leaves_everything(backend, gen, monkeypatch):
    use_backend(backend, monkeypatch)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    bufs = [torch.randn(s, generator=gen) for s in SHAPES]
    scaled = [p.clone() for p in params]
    scaled_bufs = [b.clone() for b in bufs]
    expected = [p.clone() for p in params]
    expected_bufs = [b.clone() for b in bufs]
    coef = torch.tensor(0.3)
    expected_grads = [g * coef for g in grads]
    # (torch's fused kernels leave the gradients multiplied by grad_scale, as clip_grad_norm_ would)
    sgd_momentum_step(scaled, [g.clone() for g in grads], scaled_bufs, lr=0.1, momentum=0.9, grad_scale=coef,
                      backend=backend)
    sgd_momentum_step(expected, expected_grads, expected_bufs, lr=0.1, momentum=0.9, backend=backend)
    assert rel_err(flat(scaled), flat(expected)) <= RTOL

    grads[0][5] = float("nan")
    before_p, before_b = flat(params), flat(bufs)
    lion_bufs = [b.clone() for b in bufs]
    sgd_momentum_step(params, grads, bufs, lr=0.1, momentum=0.9, skip=torch.tensor(True), backend=backend)
    assert torch.equal(flat(params), before_p) and torch.equal(flat(bufs), before_b)
    lion_step(params, grads, lion_bufs, lr=0.1, skip=torch.tensor(1.0), backend=backend)
    assert torch.equal(flat(params), before_p) and torch.equal(flat(lion_bufs), before_b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_params_with_fp32_state_agree_across_backends(backend, gen, monkeypatch):
    use_backend("triton", monkeypatch)
    params32 = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen).bfloat16() for s in SHAPES]
    out = {}
    for b in BACKENDS:
        params = [p.bfloat16() for p in params32]
        bufs = [torch.zeros_like(p) for p in params32]
        exp_avgs = [torch.zeros_like(p) for p in params32]
        sgd_momentum_step(params, grads, bufs, lr=0.1, momentum=0.9, nesterov=True, backend=b)
        lion_step(params, grads, exp_avgs, lr=0.01, weight_decay=0.1, backend=b)
        out[b] = flat(params)
    assert torch.equal(out["torch"], out["triton"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_sum_of_squares(backend, gen, monkeypatch):
    use_backend(backend, monkeypatch)
    grads = [torch.randn(s, generator=gen) for s in SHAPES] + [torch.randn(5, generator=gen).bfloat16()]
    # large fp32 and fp64 tensors take the BLAS-dot branch on CPU, the rest one foreach norm
    grads += [torch.randn(200, 130, generator=gen), torch.randn(7, generator=gen).double()]
    expected = sum(g.double().square().sum() for g in grads)
    assert rel_err(grad_sum_of_squares(grads, backend).double(), expected) <= RTOL


def test_kit_optimizer_hooks_read_group_and_state_lists(gen, monkeypatch):
    monkeypatch.delenv("LIGHTNING_OPTKIT_BACKEND", raising=False)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    ref = [p.clone().requires_grad_() for p in params]
    for r, g in zip(ref, grads):
        r.grad = g.clone()
    group = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    state = {"momentum_buffer": [torch.zeros_like(p) for p in params]}
    momentum_sgd_fused_step(group, params, grads, state, None, None)
    torch.optim.SGD(ref, **group).step()
    assert rel_err(flat(params), flat(ref)) <= RTOL

    exp_avgs = [torch.zeros_like(p) for p in params]
    expected = [lion_reference(p, g, m, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)[0]
                for p, g, m in zip(params, grads, exp_avgs)]
    lion_fused_step(dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), params, grads,
                    {"exp_avg": exp_avgs}, None, None)
    assert rel_err(flat(params), flat(expected)) <= RTOL


SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def forbid_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every Python-level way a tensor's value reaches the host raise."""
    for name in SYNC_METHODS:
        def refuse(t, *args, _name=name, **kwargs):
            raise AssertionError(f"host sync: Tensor.{_name} called inside the step")

        monkeypatch.setattr(torch.Tensor, name, refuse)


def bits(tensors) -> list[torch.Tensor]:
    """The integer bit patterns of ``tensors`` (so -0.0 != 0.0 and NaN payloads count)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return [t.detach().view(ints[t.element_size()]).clone() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_lion_skip_keeps_every_bit_without_host_sync(dtype, backend, gen, monkeypatch):
    """A skipped Lion step (NaN/inf gradients, as NonFiniteGuard skips) keeps every bit of params, state and
    gradients (the scale is not applied), -0.0, inf and NaN included."""
    use_backend(backend, monkeypatch)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/bf16/fp16; fp64 runs the torch path under any backend")
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    exp_avgs = [torch.randn(s, generator=gen).to(torch.float64 if dtype == torch.float64 else torch.float32)
                for s in SHAPES]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    params[0][:3] = torch.tensor([-0.0, float("inf"), float("nan")])
    exp_avgs[0][:3] = torch.tensor([-0.0, -float("inf"), float("nan")])
    grads[0][:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    before_p, before_m, before_g = bits(params), bits(exp_avgs), bits(grads)
    forbid_host_sync(monkeypatch)
    for lr in (1e-2, torch.tensor(1e-2)):
        lion_step(params, grads, exp_avgs, lr=lr, weight_decay=0.1, grad_scale=torch.tensor(0.3),
                  skip=torch.tensor(True), backend=backend)
        lion_step(params, grads, exp_avgs, lr=lr, weight_decay=0.0, maximize=True, skip=torch.tensor(1.0),
                  backend=backend)
    for after, before in ((params, before_p), (exp_avgs, before_m), (grads, before_g)):
        assert all(torch.equal(a, b) for a, b in zip(bits(after), before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_grad_scale_maximize_and_tensor_lr_follow_the_reference(backend, gen, monkeypatch):
    """grad_scale multiplies the gradient, maximize negates it, a 0-d tensor lr acts as the number."""
    use_backend(backend, monkeypatch)
    hp = dict(beta1=0.9, beta2=0.99, weight_decay=0.1)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    exp_avgs = [torch.randn(s, generator=gen) for s in SHAPES]
    ref_p = [p.double() for p in params]
    ref_m = [m.double() for m in exp_avgs]
    for step in range(4):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        coef = torch.rand((), generator=gen) + 0.1
        maximize = step % 2 == 1
        lr = torch.tensor(2e-3) if step >= 2 else 2e-3
        lion_step(params, [g.clone() for g in grads], exp_avgs, lr=lr, maximize=maximize, grad_scale=coef,
                  skip=torch.tensor(False), backend=backend, **hp)
        for i, g in enumerate(grads):
            g = g.double() * coef.double() * (-1 if maximize else 1)
            ref_p[i], ref_m[i] = lion_reference(ref_p[i], g, ref_m[i], lr=2e-3, **hp)
    assert rel_err(flat(params), flat(ref_p)) <= RTOL
    assert rel_err(flat(exp_avgs), flat(ref_m)) <= RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flag", [2.0, 0.5, float("nan"), -1.0])
def test_any_nonzero_skip_flag_skips_every_step_function(flag, backend, gen, monkeypatch):
    """``skip`` is a truth value: any nonzero flag (not only 1.0) leaves params, state and counters as they are."""
    use_backend(backend, monkeypatch)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    states = [[torch.randn(s, generator=gen).abs() for s in SHAPES] for _ in range(3)]
    steps = [torch.full((), 3.0) for _ in SHAPES]
    before = [flat(params), *(flat(s) for s in states), flat(steps)]
    skip = torch.tensor(flag)
    adamw_step(params, grads, states[0], states[1], [], steps, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.01, skip=skip, backend=backend)
    sgd_momentum_step(params, grads, states[2], lr=0.1, momentum=0.9, skip=skip, backend=backend)
    lion_step(params, grads, states[2], lr=0.1, skip=skip, backend=backend)
    after = [flat(params), *(flat(s) for s in states), flat(steps)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
