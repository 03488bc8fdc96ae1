"""GradientClipping against torch's own clipping, with real Lightning Trainers on CPU."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from fit_helpers import MLPRegressor, regression_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.errors import SpecError

TOL = dict(rtol=1e-5, atol=1e-6)  # float32, same op order as torch: differences are rounding only


def make_loader(n: int = 48, batch_size: int = 8) -> DataLoader:
    return regression_loader(n, batch_size, target_scale=3.0)


def make_optimizer(kind: str, params, lr: float = 0.05) -> torch.optim.Optimizer:
    if kind == "sgd_two_groups":
        params = list(params)
        return torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=lr, momentum=0.9)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


class Regressor(MLPRegressor):
    """``make_optimizer(optimizer, params)``'s optimizer."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(lambda params: make_optimizer(optimizer, params))
        self.optimizer_kind = optimizer


def hand_loop(net: nn.Module, loader: DataLoader, kind: str, clip, steps: int, accumulate: int = 1) -> list[float]:
    """Plain torch training; ``clip(params)`` is called once per optimizer step. Returns pre-clip norms."""
    opt = make_optimizer(kind, net.parameters())
    batches = iter(loader)
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            x, y = next(batches)
            (F.mse_loss(net(x), y) / accumulate).backward()
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]).item())
        clip(list(net.parameters()))
        opt.step()
    return norms


def assert_params_close(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), msg=name, **(tol or TOL))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_norm_clipping_matches_clip_grad_norm(kind, quiet_trainer_kwargs):
    loader = make_loader()
    model = Regressor(kind)
    reference = copy.deepcopy(model.net)
    clip = GradientClipping(max_norm=0.5)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=6, callbacks=[clip], log_every_n_steps=1)
    trainer.fit(model, loader)
    norms = hand_loop(reference, loader, kind, lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5), steps=6)
    assert max(norms) > 0.5, "the test must actually clip"
    assert_params_close(model.net, reference)
    # logged pre-clip norm and coefficient of the last step
    assert trainer.callback_metrics["grad_clip/total_norm"].item() == pytest.approx(norms[-1], rel=1e-5)
    expected_coef = min(1.0, 0.5 / (norms[-1] + 1e-6))
    assert trainer.callback_metrics["grad_clip/clip_coef"].item() == pytest.approx(expected_coef, rel=1e-5)
    assert clip.last_clip_coef.item() == pytest.approx(expected_coef, rel=1e-5)


@pytest.mark.parametrize("per", ["param", "group"])
def test_per_param_and_per_group_norm_clipping(per, quiet_trainer_kwargs):
    loader = make_loader()
    model = Regressor("sgd_two_groups")
    reference = copy.deepcopy(model.net)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=4, callbacks=[GradientClipping(0.3, per=per)])
    trainer.fit(model, loader)

    def clip(ps):
        if per == "param":
            for p in ps:
                torch.nn.utils.clip_grad_norm_([p], 0.3)
        else:  # the two param groups: first layer, last layer
            torch.nn.utils.clip_grad_norm_(ps[:2], 0.3)
            torch.nn.utils.clip_grad_norm_(ps[2:], 0.3)

    hand_loop(reference, loader, "sgd_two_groups", clip, steps=4)
    assert_params_close(model.net, reference)


def test_value_clipping_matches_clip_grad_value(quiet_trainer_kwargs):
    loader = make_loader()
    model = Regressor("adam")
    reference = copy.deepcopy(model.net)
    clip = GradientClipping(algorithm="value", max_value=0.05)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=5, callbacks=[clip], log_every_n_steps=1)
    trainer.fit(model, loader)
    hand_loop(reference, loader, "adam", lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.05), steps=5)
    assert_params_close(model.net, reference)
    assert 0 < clip.last_clip_coef.item() < 1  # post/pre-clip norm ratio: the value clip was active


def test_accumulation_clips_once_per_optimizer_step(quiet_trainer_kwargs):
    loader = make_loader(n=64)
    model = Regressor("sgd")
    reference = copy.deepcopy(model.net)
    clip = GradientClipping(max_norm=0.4)
    calls = []
    inner = clip.on_before_optimizer_step
    clip.on_before_optimizer_step = lambda *a: (calls.append(1), inner(*a))
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=2, accumulate_grad_batches=4, callbacks=[clip])
    trainer.fit(model, loader)
    norms = hand_loop(reference, loader, "sgd", lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.4),
                      steps=2, accumulate=4)
    assert len(calls) == 2
    assert clip.last_total_norm.item() == pytest.approx(norms[-1], rel=1e-5)
    assert_params_close(model.net, reference)


def test_bf16_mixed_on_cpu(quiet_trainer_kwargs):
    loader = make_loader()
    model = Regressor("sgd")
    reference = copy.deepcopy(model.net)
    clip = GradientClipping(max_norm=0.5)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=3, precision="bf16-mixed", callbacks=[clip])
    trainer.fit(model, loader)
    opt = make_optimizer("sgd", reference.parameters())
    for _, (x, y) in zip(range(3), loader, strict=False):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(reference(x), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
    assert clip.last_total_norm.item() == pytest.approx(norm.item(), rel=1e-4)
    assert_params_close(model.net, reference, rtol=1e-4, atol=1e-5)  # bf16 autocast: same ops, looser


class ZeroInitNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 6)
        nn.init.zeros_(self.body.weight)
        self.head = nn.Linear(6, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(self.body(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_agc_moves_zero_initialised_weights_and_matches_float64(quiet_trainer_kwargs):
    loader = make_loader(n=8)
    model = ZeroInitNet()
    ref = copy.deepcopy(model).double()
    clip = GradientClipping(algorithm="agc", clip_factor=0.01, eps=1e-3, exclude=("head",))
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=1, callbacks=[clip])
    trainer.fit(model, loader)
    # float64 reference of AGC (Brock et al. 2021) for one SGD(lr=1) step
    x, y = next(iter(loader))
    F.mse_loss(ref.head(ref.body(x.double())), y.double()).backward()
    expected = {}
    for name, p in ref.named_parameters():
        g = p.grad
        if name.startswith("head"):
            expected[name] = p - g
            continue
        dims = tuple(range(1, p.ndim))
        w_norm = p.norm(dim=dims, keepdim=True) if p.ndim > 1 else p.norm()
        g_norm = g.norm(dim=dims, keepdim=True) if p.ndim > 1 else g.norm()
        limit = w_norm.clamp_min(1e-3) * 0.01
        expected[name] = p - g * torch.clamp(limit / g_norm, max=1.0)
    got = dict(model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach().double(), value.detach(), rtol=1e-5, atol=1e-8, msg=name)
    w = model.body.weight.detach()
    assert (w != 0).all(), "AGC's eps must let zero-initialised weights move"
    torch.testing.assert_close(w.norm(dim=1), torch.full((6,), 1e-5), rtol=1e-4, atol=0)


class TwoNets(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for net, opt in ((self.a, opt_a), (self.b, opt_b)):
            opt.zero_grad()
            self.manual_backward(F.mse_loss(net(x), y))
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters(), lr=0.05)


def test_manual_optimization_two_optimizers_clip_their_own_params(quiet_trainer_kwargs):
    loader = make_loader()
    model = TwoNets()
    ref = copy.deepcopy(model)
    clip = GradientClipping(max_norm=0.2)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=6, callbacks=[clip], log_every_n_steps=1)
    trainer.fit(model, loader)  # max_steps counts both optimizers' steps: 3 batches
    opt_a = torch.optim.SGD(ref.a.parameters(), lr=0.1)
    opt_b = torch.optim.Adam(ref.b.parameters(), lr=0.05)
    for _, (x, y) in zip(range(3), loader, strict=False):
        for net, opt in ((ref.a, opt_a), (ref.b, opt_b)):
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.2)
            opt.step()
    assert_params_close(model, ref)
    # several optimizers: keys carry the optimizer's label (class name here), as OptimizerMonitor's do
    assert {"grad_clip/SGD/total_norm", "grad_clip/Adam/total_norm", "grad_clip/SGD/clip_coef"} <= set(
        trainer.callback_metrics)
    assert not any(k.endswith(("_opt0", "_opt1")) for k in trainer.callback_metrics)


def test_trainer_gradient_clip_val_conflict_fails_before_first_batch(quiet_trainer_kwargs):
    model = Regressor()
    seen = []
    model.training_step = lambda batch, idx: seen.append(idx) or F.mse_loss(model.net(batch[0]), batch[1])
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=2, gradient_clip_val=1.0,
                         callbacks=[GradientClipping(1.0)])
    with pytest.raises(SpecError, match=r"gradient_clip_val.*pick one"):
        trainer.fit(model, make_loader())
    assert seen == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(), "max_norm"),
        (dict(algorithm="value"), "max_value"),
        (dict(max_norm=1.0, algorithm="nrom"), "algorithm"),
        (dict(max_norm=1.0, algorithm="norm", z_thresh=2.0), "z_thresh"),
        (dict(algorithm="agc", clip_facter=0.1), "clip_facter"),
        (dict(algorithm="agc", max_norm=1.0), "max_norm"),
        (dict(max_norm=1.0, max_value=1.0), "max_value"),
        (dict(max_norm=-1.0), "max_norm"),
        (dict(max_norm=1.0, per="layer"), "per"),
        (dict(algorithm="zscore", per="param"), "per"),
        (dict(max_norm=1.0, norm_type=0), "norm_type"),
        (dict(algorithm="zscore", alpha=1.5), "alpha"),
        (dict(algorithm="quantile", quantile=0.0), "quantile"),
        (dict(algorithm="quantile", history=10, warmup_steps=20), "warmup_steps"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(SpecError) as err:
        GradientClipping(**kwargs)
    assert err.value.field == field
    assert "Fix:" in str(err.value)


def test_unknown_algorithm_suggests_the_closest():
    with pytest.raises(SpecError, match="did you mean 'norm'"):
        GradientClipping(1.0, algorithm="nrom")


def test_exclude_pattern_matching_nothing_is_an_error(quiet_trainer_kwargs):
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=1, callbacks=[GradientClipping(1.0, exclude=("haed",))])
    with pytest.raises(SpecError, match="exclude='haed' matches no parameter"):
        trainer.fit(Regressor(), make_loader())


def test_nonfinite_norm_gives_nan_coefficient_not_a_finite_one():
    from lightning_optkit.callbacks.clipping import clip_coefficient

    for bad in (math.inf, math.nan):
        assert torch.isnan(clip_coefficient(1.0, torch.tensor(bad)))
    assert clip_coefficient(1.0, torch.tensor(4.0)).item() == pytest.approx(1.0 / (4.0 + 1e-6))
    assert clip_coefficient(1.0, torch.tensor(0.5)).item() == 1.0


def test_mixin_manual_step_two_optimizers_with_clipping_and_guard(quiet_trainer_kwargs):
    from lightning_optkit.callbacks.guard import NonFiniteGuard
    from lightning_optkit.mixin import OptimizerMixin
    from lightning_optkit.spec import OptimizerSpec

    class SpecNets(OptimizerMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 4)
            self.b = nn.Linear(8, 4)
            self.optim_spec = [OptimizerSpec("sgd", lr=0.1, params="a.*", name="a"),
                               OptimizerSpec("adam", lr=0.05, params="b.*", name="b")]

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.manual_step(F.mse_loss(self.a(x), y) * (math.nan if batch_idx == 1 else 1.0), optimizer="a")
            self.manual_step(F.mse_loss(self.b(x), y), optimizer="b")

    loader = make_loader()
    model = SpecNets()
    ref = copy.deepcopy(model)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=6, log_every_n_steps=1,
                         callbacks=[GradientClipping(max_norm=0.2), NonFiniteGuard()])
    trainer.fit(model, loader)
    opt_a = torch.optim.SGD(ref.a.parameters(), lr=0.1)
    opt_b = torch.optim.Adam(ref.b.parameters(), lr=0.05)
    for i, (x, y) in zip(range(3), loader, strict=False):
        for net, opt in ((ref.a, opt_a), (ref.b, opt_b)):
            if net is ref.a and i == 1:
                continue  # the NaN step of optimizer "a" is skipped
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.2)
            opt.step()
    assert_params_close(model, ref)
    # several optimizers built from a spec: keys carry the spec's optimizer name
    assert trainer.callback_metrics["guard/a/skipped_steps"].item() == 1
    assert trainer.callback_metrics["guard/b/skipped_steps"].item() == 0
    assert {"grad_clip/a/total_norm", "grad_clip/b/clip_coef", "guard/a/consecutive_skips"} <= set(
        trainer.callback_metrics)


class LBFGSRegressor(Regressor):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


def test_lbfgs_closure_reevaluations_are_each_clipped_with_their_own_norm(quiet_trainer_kwargs):
    """LBFGS runs the closure several times per step; each new gradient must get its own norm.

    The gradients of a re-run closure are new tensors that may reuse the freed ones' addresses, so a
    norm cache keyed on ids alone would clip them with the previous evaluation's norm.
    """
    torch.manual_seed(0)
    loader = make_loader(n=24, batch_size=8)
    model = LBFGSRegressor()
    reference = copy.deepcopy(model.net)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=3, callbacks=[GradientClipping(max_norm=0.3)])
    trainer.fit(model, loader)

    opt = torch.optim.LBFGS(reference.parameters(), lr=0.5, max_iter=4)
    norms = []
    for x, y in loader:
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.mse_loss(reference(x), y)
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.3)))
            return loss

        opt.step(closure)
    assert len(norms) > 3 and len(set(norms)) == len(norms), "the closure must run several times per step"
    assert max(norms) > 0.3, "the test must actually clip"
    # bit-identical: the kit's coefficient is computed as clip_grad_norm_ computes it (LBFGS would
    # amplify any rounding difference into a visible one within a few steps)
    for p, q in zip(model.net.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)



CHAINS = {
    "value-then-norm": (dict(algorithm="value", max_value=0.05), dict(max_norm=0.2)),
    "norm-then-norm": (dict(max_norm=0.5), dict(max_norm=0.2)),
    "norm-then-value": (dict(max_norm=0.5), dict(algorithm="value", max_value=0.02)),
}


def _torch_clip(options: dict, ps) -> None:
    if options.get("algorithm") == "value":
        torch.nn.utils.clip_grad_value_(ps, options["max_value"])
    else:
        torch.nn.utils.clip_grad_norm_(ps, options["max_norm"])


@pytest.mark.parametrize("kind", ["sgd", "adam", "momentum_sgd"])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_a_second_clipper_sees_the_first_ones_result(kind, chain, quiet_trainer_kwargs):
    """Two GradientClipping callbacks compose: the second clips the gradient the first produced.

    With the kit's MomentumSGD a global-norm coefficient is deferred to the optimizer's step instead
    of applied to the gradients; the second clipper must count it, and an element-wise one must act on
    the scaled gradients (the reference is torch's SGD, which MomentumSGD matches).
    """
    from lightning_optkit.optim import MomentumSGD

    first, second_options = CHAINS[chain]
    torch.manual_seed(0)
    loader = make_loader()
    model = Regressor("sgd" if kind == "momentum_sgd" else kind)
    if kind == "momentum_sgd":
        model.configure_optimizers = lambda: MomentumSGD(model.parameters(), lr=0.05, momentum=0.9)
    reference = copy.deepcopy(model.net)
    second = GradientClipping(**second_options)
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=4, log_every_n_steps=1,
                         callbacks=[GradientClipping(**first), second])
    trainer.fit(model, loader)

    def both(ps):
        _torch_clip(first, ps)
        _torch_clip(second_options, ps)

    norms = hand_loop(reference, loader, "sgd" if kind == "momentum_sgd" else kind, both, steps=4)
    assert second.last_clip_coef.item() < 1  # the second clipper had work to do
    assert_params_close(model.net, reference)
    # each clipper logs under its own keys; the first one's total_norm is the backward's norm
    names = [o.get("algorithm", "norm") for o in (first, second_options)]
    second_name = f"{names[1]}-1" if names[0] == names[1] else names[1]
    keys = [f"grad_clip/{names[0]}/total_norm", f"grad_clip/{second_name}/total_norm"]
    assert set(keys) <= set(trainer.callback_metrics)
    assert trainer.callback_metrics[keys[0]].item() == pytest.approx(norms[-1], rel=1e-5)


@pytest.mark.parametrize("kit", [False, True], ids=["torch-sgd", "kit-momentum-sgd"])
@pytest.mark.parametrize("scale", [1.0, 1e40], ids=["ordinary", "beyond-float32-range"])
def test_float64_training_clips_exactly_as_torch(scale, kit, quiet_trainer_kwargs):
    """precision="64-true": norms and coefficient in float64, as clip_grad_norm_ computes them.

    A float64 gradient norm of 1e40 is finite; a float32 norm would overflow to inf and turn the clipped
    gradients into NaN.
    """
    torch.manual_seed(0)
    x, y = torch.randn(48, 8).double(), torch.randn(48, 4).double() * 3.0 * scale
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = Regressor("sgd")
    if kit:  # the coefficient is deferred to the kit optimizer's step: it must stay float64 there too
        from lightning_optkit.optim import MomentumSGD

        model.configure_optimizers = lambda: MomentumSGD(model.parameters(), lr=0.05, momentum=0.9)
    reference = copy.deepcopy(model.net).double()
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=4, precision="64-true",
                         callbacks=[GradientClipping(max_norm=0.5)])
    trainer.fit(model, loader)
    norms = hand_loop(reference, loader, "sgd", lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5), steps=4)
    assert max(norms) > 0.5
    for p, q in zip(model.net.parameters(), reference.parameters(), strict=True):
        assert p.dtype == torch.float64 and torch.isfinite(p).all()
        assert torch.equal(p, q)


def test_clippers_differing_only_in_options_coexist(quiet_trainer_kwargs):
    """Lightning refuses two stateful callbacks with one state_key: every option is part of it."""
    pairs = [(GradientClipping(algorithm="zscore", z_thresh=2.0), GradientClipping(algorithm="zscore", z_thresh=3.0)),
             (GradientClipping(algorithm="agc", clip_factor=0.01), GradientClipping(algorithm="agc", clip_factor=0.1)),
             (GradientClipping(max_norm=1.0), GradientClipping(max_norm=1.0, norm_type=1.0))]
    for a, b in pairs:
        assert a.state_key != b.state_key
        trainer = pl.Trainer(**quiet_trainer_kwargs, max_steps=2, callbacks=[a, b])
        trainer.fit(Regressor(), make_loader())
        assert trainer.global_step == 2
