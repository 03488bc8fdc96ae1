"""Kit optimizers against float64 references of their papers' rules, and MomentumSGD against torch SGD."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from lightning_optkit.optim.adan import Adan
from lightning_optkit.optim.lamb import LAMB
from lightning_optkit.optim.lion import Lion
from lightning_optkit.optim.momentum_sgd import MomentumSGD
from lightning_optkit.optim.schedulefree import ScheduleFreeAdamW

STEPS = 25
REL_TOL = 1e-6  # max |p - ref| <= REL_TOL * max |ref|, per tensor, float32 run vs float64 reference


def random_shapes(gen: torch.Generator) -> list[tuple[int, ...]]:
    shapes = [(1,), (7,), (5, 3), (4, 6), (2, 3, 4), (16, 9)]
    order = torch.randperm(len(shapes), generator=gen).tolist()
    return [shapes[i] for i in order[: 3 + int(torch.randint(0, 3, (), generator=gen))]]


def uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


# ----------------------------------------------------------------------------- float64 references
def lion_reference(ps, grads_per_step, lr, b1, b2, wd):
    m = [torch.zeros_like(p) for p in ps]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            c = b1 * m[i] + (1 - b1) * g
            ps[i] = ps[i] * (1 - lr * wd) - lr * torch.sign(c)
            m[i] = b2 * m[i] + (1 - b2) * g
    return ps


def lamb_reference(ps, grads_per_step, lr, b1, b2, eps, wd, max_ratio):
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = (m[i] / (1 - b1**t)) / (torch.sqrt(v[i] / (1 - b2**t)) + eps) + wd * ps[i]
            wn, un = ps[i].norm(), u.norm()
            ratio = min(float(wn / un), max_ratio) if wn > 0 and un > 0 else 1.0
            ps[i] = ps[i] - lr * ratio * u
    return ps


def adan_reference(ps, grads_per_step, lr, b1, b2, b3, eps, wd, no_prox):
    m = [torch.zeros_like(p) for p in ps]
    d = [torch.zeros_like(p) for p in ps]
    n = [torch.zeros_like(p) for p in ps]
    prev = [None] * len(ps)
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            diff = torch.zeros_like(g) if prev[i] is None else g - prev[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            d[i] = b2 * d[i] + (1 - b2) * diff
            n[i] = b3 * n[i] + (1 - b3) * (g + b2 * diff) ** 2
            m_hat, d_hat, n_hat = m[i] / (1 - b1**t), d[i] / (1 - b2**t), n[i] / (1 - b3**t)
            step = lr * (m_hat + b2 * d_hat) / (torch.sqrt(n_hat) + eps)
            if no_prox:
                ps[i] = ps[i] * (1 - lr * wd) - step
            else:
                ps[i] = (ps[i] - step) / (1 + lr * wd)
            prev[i] = g
    return ps


def schedulefree_reference(ps, grads_per_step, lr, b1, b2, eps, wd, warmup, r, power):
    """The paper's three sequences kept explicitly: z (SGD-like), x (average), y (gradient point)."""
    z = [p.clone() for p in ps]
    x = [p.clone() for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    weight_sum, lr_max = 0.0, -1.0
    for t, grads in enumerate(grads_per_step, start=1):
        lr_t = lr * min(1.0, t / warmup) if warmup else lr
        lr_max = max(lr_max, lr_t)
        weight = t**r * lr_max**power
        weight_sum += weight
        c = weight / weight_sum
        for i, g in enumerate(grads):
            y = (1 - b1) * z[i] + b1 * x[i]
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = g / (torch.sqrt(v[i] / (1 - b2**t)) + eps) + wd * y
            z[i] = z[i] - lr_t * u
            x[i] = (1 - c) * x[i] + c * z[i]
    return [(1 - b1) * zi + b1 * xi for zi, xi in zip(z, x)]  # train mode: parameters hold y


def sample_case(name: str, gen: torch.Generator):
    """Random hyperparameters: (kit optimizer kwargs, reference function of (ps, grads))."""
    lr = uniform(gen, 1e-3, 3e-2)
    wd = uniform(gen, 0.0, 0.2)
    b1, b2 = uniform(gen, 0.8, 0.95), uniform(gen, 0.9, 0.999)
    eps = 10 ** uniform(gen, -8, -6)
    if name == "lion":
        return Lion, dict(lr=lr, betas=(b1, b2), weight_decay=wd), lambda ps, gs: lion_reference(ps, gs, lr, b1, b2, wd)
    if name == "lamb":
        kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, max_trust_ratio=uniform(gen, 2.0, 10.0))
        return LAMB, kw, lambda ps, gs: lamb_reference(ps, gs, lr, b1, b2, eps, wd, kw["max_trust_ratio"])
    if name in ("adan", "adan_no_prox"):
        b3 = uniform(gen, 0.95, 0.999)
        no_prox = name == "adan_no_prox"
        kw = dict(lr=lr, betas=(b1, b2, b3), eps=eps, weight_decay=wd, no_prox=no_prox)
        return Adan, kw, lambda ps, gs: adan_reference(ps, gs, lr, b1, b2, b3, eps, wd, no_prox)
    if name == "schedulefree":
        warmup, r, power = int(torch.randint(0, 10, (), generator=gen)), uniform(gen, 0, 1), uniform(gen, 0, 3)
        kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, warmup_steps=warmup, r=r, weight_lr_power=power)
        return ScheduleFreeAdamW, kw, lambda ps, gs: schedulefree_reference(
            ps, gs, lr, b1, b2, eps, wd, warmup, r, power)
    raise AssertionError(name)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", ["lion", "lamb", "adan", "adan_no_prox", "schedulefree"])
def test_matches_float64_reference(name: str, seed: int, foreach: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    cls, kwargs, reference = sample_case(name, gen)
    shapes = random_shapes(gen)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(STEPS)]

    params = [torch.nn.Parameter(p.float()) for p in start]
    optimizer = cls(params, foreach=foreach, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.float()
        optimizer.step()

    # The reference starts from the float32-rounded start and sees the float32-rounded grads.
    expected = reference([p.float().double() for p in start], [[g.float().double() for g in gs] for gs in grads])
    for got, want in zip(params, expected):
        err = (got.detach().double() - want).abs().max()
        assert err <= REL_TOL * want.abs().max(), f"{name}: max error {err:.3g} vs scale {want.abs().max():.3g}"


def train_side_by_side(model: torch.nn.Module, ours: torch.optim.Optimizer, twin: torch.nn.Module,
                       theirs: torch.optim.Optimizer, steps: int) -> None:
    """Step both on the same fresh batches; the parameters must stay bit-identical after every step."""
    for _ in range(steps):
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.03])
def test_momentum_sgd_is_torch_sgd_bit_for_bit(foreach: bool, nesterov: bool, weight_decay: float) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    twin = copy.deepcopy(model)
    ours = MomentumSGD(model.parameters(), lr=0.05, momentum=0.85, weight_decay=weight_decay,
                       nesterov=nesterov, foreach=foreach)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.85, dampening=0.0,
                             weight_decay=weight_decay, nesterov=nesterov, foreach=foreach)
    train_side_by_side(model, ours, twin, theirs, STEPS)
    # Same state_dict format as torch: the SGD state loads into ours and vice versa.
    for a, b in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


ALL = [
    (MomentumSGD, dict(lr=0.05, nesterov=True, weight_decay=0.01)),
    (Lion, dict(lr=1e-2, weight_decay=0.1)),
    (LAMB, dict(lr=1e-2)),
    (Adan, dict(lr=1e-2, weight_decay=0.02)),
    (ScheduleFreeAdamW, dict(lr=1e-2, warmup_steps=3, weight_decay=0.01)),
]


@pytest.mark.parametrize(("cls", "kwargs"), ALL, ids=lambda v: getattr(v, "__name__", ""))
def test_state_dict_mid_run_continues_bit_for_bit(cls, kwargs) -> None:
    shapes = [(4, 5), (5,), (3, 2, 2)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(10)]
    optimizer = cls(params, **kwargs)

    def run(ps, opt, step_grads):
        for gs in step_grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()

    run(params, optimizer, grads[:5])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    run(params, optimizer, grads[5:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = [torch.nn.Parameter(p) for p in saved["params"]]
    restored = cls(fresh, **kwargs)
    restored.load_state_dict(saved["optimizer"])
    run(fresh, restored, grads[5:])
    for a, b in zip(params, fresh):
        assert torch.equal(a, b)
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, restored.state_dict()["state"][0][key]), key


def test_bias_correction_keeps_float32_precision() -> None:
    from lightning_optkit.optim.base import bias_correction

    steps = [torch.tensor(float(t)) for t in (1, 2, 10, 1000)]
    got = bias_correction(steps, 0.999).double()
    want = torch.tensor([1 - 0.999**t for t in (1, 2, 10, 1000)], dtype=torch.float64)
    assert ((got - want).abs() / want).max() < 1e-6
    assert math.isclose(float(bias_correction([torch.tensor(3.0)], 0.0)), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_fused_and_foreach_agree_bit_for_bit(dtype, weight_decay) -> None:
    """On the torch backend (CPU) both paths run the same foreach operations: equal bits, also with a deferred
    clip scale and a skipped step."""
    shapes = [(5, 3), (7,), (64, 9)]
    start = [torch.randn(s, dtype=dtype) for s in shapes]
    runs = []
    for fused in (None, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = Lion(params, lr=1e-2, weight_decay=weight_decay, fused=fused)
        gen = torch.Generator().manual_seed(7)
        for step in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            if step >= 4:  # guarded steps: a clip coefficient and a skip flag, skipping step 5
                optimizer.defer_grad_scale(torch.tensor(0.37, dtype=dtype))
                optimizer.defer_skip(torch.tensor(step == 5))
            optimizer.step()
        runs.append((params, [optimizer.state[p]["exp_avg"] for p in params]))
    (a, ma), (b, mb) = runs
    for x, y in zip([*a, *ma], [*b, *mb]):
        assert torch.equal(x.view(torch.int64 if dtype == torch.float64 else torch.int32),
                           y.view(torch.int64 if dtype == torch.float64 else torch.int32))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.03])
def test_momentum_sgd_dampening_is_torch_sgd_bit_for_bit(foreach: bool, weight_decay: float, tmp_path) -> None:
    """torch's first step copies the gradient undamped; later ones add (1 - dampening) * g. A torch SGD
    checkpoint (no step counters) continues identically in the kit."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.85, dampening=0.4, weight_decay=weight_decay, foreach=foreach)
    ours, theirs = MomentumSGD(model.parameters(), **kw), torch.optim.SGD(twin.parameters(), **kw)
    train_side_by_side(model, ours, twin, theirs, 6)
    torch.save(theirs.state_dict(), tmp_path / "sgd.pt")
    ours = MomentumSGD(model.parameters(), **kw)
    ours.load_state_dict(torch.load(tmp_path / "sgd.pt", weights_only=True))
    train_side_by_side(model, ours, twin, theirs, 4)


def test_momentum_sgd_dampening_errors_name_the_field() -> None:
    from lightning_optkit.errors import SpecError

    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(SpecError, match="nesterov"):
        MomentumSGD(params, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(SpecError, match="dampening"):
        MomentumSGD(params, momentum=0.9, dampening=0.1, fused=True)
    with pytest.raises(SpecError, match="dampening"):
        MomentumSGD(params, dampening=-0.1)
