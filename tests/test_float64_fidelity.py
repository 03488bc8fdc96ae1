"""Float64 runs are float64 end to end: every kit optimizer and every clipping path against a float64
reference to 1e-14 relative (not float32 tolerances), and the FusedAdamW norm at the edges of the ranges."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from fit_helpers import MLPRegressor
from kernel_helpers import use_backend
from test_optim_parity import adan_reference, lamb_reference, lion_reference, random_shapes, schedulefree_reference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.optim import LAMB, Adan, FusedAdamW, Lion, MomentumSGD, ScheduleFreeAdamW

# max |p - ref| <= REL * max |ref| per tensor: float64 roundoff only. Over 12 steps it reaches 1.6e-15 on
# some inputs (measured over 60 seeds per case: Lion 1.15e-15, ScheduleFreeAdamW up to 1.6e-15), so 1e-15
# failed now and then; one float32 operation anywhere in a step would give errors of 1e-8 or more.
REL = 1e-14
STEPS = 12


def assert_float64_close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float64, what
        err = (g.detach() - w.detach()).abs().max()
        assert err <= REL * w.abs().max(), f"{what}: max error {err:.3g} vs scale {w.abs().max():.3g}"


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


# ------------------------------------------------------------------------------------------- optimizers
CASES = {
    "lion": (Lion, dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1),
             lambda ps, gs: lion_reference(ps, gs, 3e-3, 0.9, 0.99, 0.1)),
    "lamb": (LAMB, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05, max_trust_ratio=5.0),
             lambda ps, gs: lamb_reference(ps, gs, 1e-2, 0.9, 0.99, 1e-7, 0.05, 5.0)),
    "adan": (Adan, dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02),
             lambda ps, gs: adan_reference(ps, gs, 1e-2, 0.98, 0.92, 0.99, 1e-8, 0.02, False)),
    "adan_no_prox": (Adan, dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02, no_prox=True),
                     lambda ps, gs: adan_reference(ps, gs, 1e-2, 0.98, 0.92, 0.99, 1e-8, 0.02, True)),
    "schedulefree": (ScheduleFreeAdamW, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                                             warmup_steps=5, r=0.5, weight_lr_power=2.0),
                     lambda ps, gs: schedulefree_reference(ps, gs, 1e-2, 0.9, 0.999, 1e-8, 0.01, 5, 0.5, 2.0)),
}


@pytest.mark.parametrize("path", ["foreach", "per_param", "fused"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kit_optimizers_in_float64_match_the_float64_reference(name, path, gen):
    cls, kwargs, reference = CASES[name]
    if path == "fused" and cls.fused_step is None:
        pytest.skip(f"{cls.__name__} has no fused path")
    shapes = random_shapes(gen)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(STEPS)]
    params = [nn.Parameter(p.clone()) for p in start]
    extra = {"fused": True} if path == "fused" else {"foreach": path == "foreach"}
    optimizer = cls(params, **kwargs, **extra)
    run(optimizer, params, grads)
    for state in optimizer.state.values():  # scalar state (step counters, running sums) is float64 too
        assert all(v.dtype == torch.float64 for v in state.values())
    assert_float64_close(params, reference([p.clone() for p in start], grads), f"{name}/{path}")


@pytest.mark.parametrize("path", ["foreach", "per_param", "fused"])
@pytest.mark.parametrize(("dampening", "nesterov"), [(0.0, False), (0.0, True), (0.3, False)])
def test_momentum_sgd_in_float64_is_torch_sgd(dampening, nesterov, path, gen):
    if path == "fused" and dampening:
        pytest.skip("fused=True takes dampening=0 only")
    shapes = random_shapes(gen)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(STEPS)]
    ours = [nn.Parameter(p.clone()) for p in start]
    theirs = [nn.Parameter(p.clone()) for p in start]
    kw = dict(lr=0.05, momentum=0.85, dampening=dampening, weight_decay=0.01, nesterov=nesterov)
    extra = {"fused": True} if path == "fused" else {"foreach": path == "foreach"}
    run(MomentumSGD(ours, **kw, **extra), ours, grads)
    run(torch.optim.SGD(theirs, **kw), theirs, grads)
    assert_float64_close(ours, theirs, f"momentum_sgd/{path}")


def test_fused_adamw_in_float64_matches_torch_adamw(gen):
    shapes = random_shapes(gen)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(STEPS)]
    ours = [nn.Parameter(p.clone()) for p in start]
    theirs = [nn.Parameter(p.clone()) for p in start]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    opt = FusedAdamW(ours, **kw, max_grad_norm=0.5)
    ref = torch.optim.AdamW(theirs, **kw)
    for step_grads in grads:
        for p, q, g in zip(ours, theirs, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        ref.step()
    assert opt.last_grad_norm.dtype == torch.float64
    assert_float64_close(ours, theirs, "fused_adamw")


# ----------------------------------------------------------------------------------- clipping paths
Regressor = MLPRegressor  # make_optimizer(params) builds its optimizer


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def sgd_two_groups(params):
    params = list(params)
    return torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.05, momentum=0.9)


OPTIMIZERS = {  # (in the fit, in the reference loop)
    "sgd": (sgd, sgd),
    "momentum_sgd": (lambda ps: MomentumSGD(ps, lr=0.05, momentum=0.9), sgd),
    "momentum_sgd_fused": (lambda ps: MomentumSGD(ps, lr=0.05, momentum=0.9, fused=True), sgd),
    "lion_fused": (lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1, fused=True),
                   lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1)),
    "fused_adamw": (lambda ps: FusedAdamW(ps, lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
    "sgd_two_groups": (sgd_two_groups, sgd_two_groups),
}


def unit_norms(x: torch.Tensor) -> torch.Tensor:
    return x.norm() if x.ndim <= 1 else x.norm(dim=tuple(range(1, x.ndim)), keepdim=True)


def agc_reference(params, clip_factor=0.01, eps=1e-3):
    for p in params:
        limit = unit_norms(p.detach()).clamp_min(eps) * clip_factor
        p.grad.mul_(torch.clamp(limit / unit_norms(p.grad).clamp_min(1e-6), max=1.0))


class ZScoreReference:
    """RunningNormStats' rule in plain float64: exact mean/variance for ``warmup`` norms, then an EMA."""

    def __init__(self, z=0.5, alpha=0.97, warmup=3, max_norm=0.3):
        self.z, self.alpha, self.warmup, self.max_norm = z, alpha, warmup, max_norm
        self.mean = self.var = self.count = 0.0

    def __call__(self, params):
        total = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        threshold = self.mean + self.z * self.var ** 0.5 if self.count >= self.warmup else self.max_norm
        x = min(total, threshold)
        w = 1.0 / (self.count + 1.0) if self.count < self.warmup else 1.0 - self.alpha
        d = x - self.mean
        self.mean, self.var, self.count = self.mean + w * d, (1.0 - w) * (self.var + w * d * d), self.count + 1
        torch.nn.utils.clip_grad_norm_(params, threshold)


class QuantileReference:
    def __init__(self, quantile=0.5, warmup=3, max_norm=0.3):
        self.quantile, self.warmup, self.max_norm, self.history = quantile, warmup, max_norm, []

    def __call__(self, params):
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        ready = len(self.history) >= self.warmup
        threshold = torch.quantile(torch.stack(self.history), self.quantile) if ready else self.max_norm
        self.history.append(total)
        torch.nn.utils.clip_grad_norm_(params, threshold)


def per_param(params):
    for p in params:
        torch.nn.utils.clip_grad_norm_([p], 0.5)


def per_group(params):
    torch.nn.utils.clip_grad_norm_(params[:2], 0.5)
    torch.nn.utils.clip_grad_norm_(params[2:], 0.5)


CLIPS = {  # (callback, reference applied to the gradients, optimizers it runs with)
    "norm": (lambda: GradientClipping(max_norm=0.5), lambda: lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5),
             ["sgd", "momentum_sgd", "momentum_sgd_fused", "lion_fused", "fused_adamw"]),
    "norm_per_param": (lambda: GradientClipping(max_norm=0.5, per="param"), lambda: per_param, ["sgd"]),
    "norm_per_group": (lambda: GradientClipping(max_norm=0.5, per="group"), lambda: per_group, ["sgd_two_groups"]),
    "value": (lambda: GradientClipping(algorithm="value", max_value=0.05),
              lambda: lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.05), ["sgd", "momentum_sgd_fused"]),
    "agc": (lambda: GradientClipping(algorithm="agc", clip_factor=0.01), lambda: agc_reference, ["sgd"]),
    # max_norm 0.3 (not a float32 number) clips the warmup steps; the thresholds after it bind as well
    "zscore": (lambda: GradientClipping(algorithm="zscore", max_norm=0.3, z_thresh=0.5, warmup_steps=3),
               ZScoreReference, ["sgd"]),
    "quantile": (lambda: GradientClipping(algorithm="quantile", max_norm=0.3, quantile=0.5, warmup_steps=3),
                 QuantileReference, ["sgd"]),
}
RUNS = [(clip, opt) for clip, (_, _, opts) in CLIPS.items() for opt in opts]


@pytest.mark.parametrize(("clip", "opt"), RUNS, ids=[f"{c}-{o}" for c, o in RUNS])
def test_every_clipping_path_in_float64_matches_the_float64_reference(clip, opt, quiet_trainer_kwargs):
    """precision="64-true": the clipped run equals torch's clipping (or the algorithm written out in float64)
    followed by the float64 reference optimizer, to float64 roundoff."""
    make_callback, make_reference, _ = CLIPS[clip]
    fit_optimizer, reference_optimizer = OPTIMIZERS[opt]
    x, y = torch.randn(48, 8).double(), torch.randn(48, 4).double() * 3.0
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = Regressor(fit_optimizer)
    net = copy.deepcopy(model.net).double()
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=6, precision="64-true", callbacks=[make_callback()])
    trainer.fit(model, loader)

    clip_reference, ref_opt = make_reference(), reference_optimizer(net.parameters())
    clipped = 0
    for step, (xb, yb) in zip(range(6), loader):
        ref_opt.zero_grad()
        F.mse_loss(net(xb), yb).backward()
        before = [p.grad.clone() for p in net.parameters()]
        clip_reference(list(net.parameters()))
        clipped += step >= 3 and any(not torch.equal(b, p.grad) for b, p in zip(before, net.parameters()))
        ref_opt.step()
    assert clipped, "the clip never acted after the first steps: the test would not see its precision"
    assert_float64_close(list(model.net.parameters()), list(net.parameters()), f"{clip}/{opt}")


# ----------------------------------------------------------------------- FusedAdamW at the range edges
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_adamw_steps_on_a_float64_gradient_beyond_the_float32_range(backend, gen, monkeypatch):
    """A finite float64 gradient of norm 2e20 (its square overflows float32): AdamW steps, no skip."""
    use_backend(backend, monkeypatch)
    start = torch.randn(4, generator=gen, dtype=torch.float64)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt, ref = FusedAdamW([ours], lr=0.1, backend=backend), torch.optim.AdamW([theirs], lr=0.1)
    grad = torch.full((4,), 1e20, dtype=torch.float64) * torch.randn(4, generator=gen, dtype=torch.float64).sign()
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt.step()
    ref.step()
    assert int(opt.skipped_steps) == 0
    assert opt.last_grad_norm.dtype == torch.float64 and torch.isfinite(opt.last_grad_norm)
    torch.testing.assert_close(opt.last_grad_norm, grad.norm(), rtol=1e-15, atol=0)
    assert not torch.equal(ours, start)
    assert_float64_close([ours], [theirs], "fused_adamw float64 overflow")


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize(("backend", "layout"), [("torch", "many_tensors"), ("triton", "many_tensors"),
                                                  ("triton", "one_tensor")])
def test_fused_adamw_float32_gradient_whose_squared_norm_overflows_float32(backend, layout, clip, gen, monkeypatch):
    """float32 gradients of norm about 4e19: every entry is finite and so is the norm, but the sum of squares
    (1.6e39) is not representable in float32. FusedAdamW steps (no skip) and matches a float64 reference of
    (clip_grad_norm_ +) AdamW; torch's own clip_grad_norm_ gives inf here.

    ``many_tensors``: each tensor's squared norm fits, their sum does not (both backends). ``one_tensor``: one
    tensor's own squared norm overflows (the Triton kernel scales per chunk; the torch path does not, see
    torch_sum_of_squares)."""
    use_backend(backend, monkeypatch)
    shapes = [(4,)] * 8 if layout == "many_tensors" else [(4100,)]
    per_entry = 4e19 / (sum(s[0] for s in shapes) ** 0.5)
    grads = [torch.randn(s, generator=gen).sign() * per_entry * (1 + 0.1 * torch.rand(s, generator=gen))
             for s in shapes]
    assert all(torch.isfinite(g).all() for g in grads)
    assert not torch.isfinite(sum(g.square().sum() for g in grads))  # the float32 sum of squares overflows
    start = [torch.randn(s, generator=gen) for s in shapes]
    ours = [nn.Parameter(p.clone()) for p in start]
    opt = FusedAdamW(ours, lr=0.1, max_grad_norm=clip, backend=backend)
    for p, g in zip(ours, grads):
        p.grad = g.clone()
    opt.step()

    assert int(opt.skipped_steps) == 0 and torch.isfinite(opt.last_grad_norm)
    want_norm = torch.cat([g.double().reshape(-1) for g in grads]).norm()
    torch.testing.assert_close(opt.last_grad_norm.double(), want_norm, rtol=1e-6, atol=0)
    theirs = [nn.Parameter(p.double()) for p in start]
    ref = torch.optim.AdamW(theirs, lr=0.1)
    for q, g in zip(theirs, grads):
        q.grad = g.double()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(theirs, clip)
    ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach().double(), q.detach(), rtol=1e-6, atol=1e-6)
