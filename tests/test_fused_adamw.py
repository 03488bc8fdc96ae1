"""FusedAdamW against torch.optim.AdamW on both backends (Triton through its CPU interpreter)."""

from __future__ import annotations

import copy
import logging
import os
import pickle

import lightning as L
import pytest
import torch
from kernel_helpers import use_backend
from torch import nn

from lightning_optkit.errors import SpecError
from lightning_optkit.optim.fused_adamw import FusedAdamW
from lightning_optkit.registry import resolve_optimizer

BACKENDS = ["torch", "triton"]
# One tensor longer than a 4096-element chunk, odd sizes and a one-element tensor.
SHAPES = [(4100,), (3, 7), (1,), (64,)]
STEPS = 10
RTOL = 1e-6


def _torch_adamw_configs() -> list:
    """torch's own AdamW test configurations for CPU.

    ``torch.testing._internal.common_optimizers`` is a private torch test helper, used here (and only
    here) because it is the list of configurations torch itself tests AdamW with. It imports
    ``expecttest`` (a torch test dependency, in the dev extras).
    """
    from torch.testing._internal.common_optimizers import optim_inputs_func_adamw

    return list(optim_inputs_func_adamw(device="cpu"))


# Keys FusedAdamW does not take, with why: they select torch's own implementation variants.
NOT_APPLICABLE = {
    "foreach": "selects torch's for-loop vs foreach implementation; FusedAdamW always fuses",
    "fused": "selects torch's fused kernel; FusedAdamW always fuses",
    "capturable": "FusedAdamW's Triton path is always capturable; the torch path follows torch fused",
    "differentiable": "FusedAdamW runs under no_grad, like torch's fused AdamW",
}


def _config_params() -> list:
    cases = []
    for config in _torch_adamw_configs():
        blocked = sorted(set(config.kwargs) & set(NOT_APPLICABLE))
        tensor_betas = any(isinstance(b, torch.Tensor) for b in config.kwargs.get("betas", ()))
        marks = []
        if blocked:
            marks.append(pytest.mark.skip(reason=f"{blocked[0]}: {NOT_APPLICABLE[blocked[0]]}"))
        elif tensor_betas:
            marks.append(pytest.mark.skip(reason="tensor betas: FusedAdamW takes float betas"))
        for backend in BACKENDS:
            cases.append(pytest.param(config.kwargs, backend, id=f"{config.desc}-{backend}", marks=marks))
    return cases


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def make_pair(gen, dtype=torch.float32):
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]
    ref = [p.detach().clone().requires_grad_() for p in params]
    return params, ref


def set_grads(params, ref, gen, scale: float = 1.0) -> None:
    for p, r in zip(params, ref):
        g = torch.randn(p.shape, generator=gen) * scale
        p.grad = g.to(p.dtype, copy=True)
        r.grad = g.to(r.dtype, copy=True)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def assert_same_as_torch(opt: FusedAdamW, ref_opt: torch.optim.Optimizer, params, ref) -> None:
    """Parameters and every state tensor within RTOL of torch's, relative to the largest entry."""
    assert rel_err(flat(params), flat(ref)) <= RTOL
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in ref_opt.state[ref[0]]:
            ours = flat(opt.state[p][key] for p in params)
            theirs = flat(ref_opt.state[r][key] for r in ref)
            assert rel_err(ours, theirs) <= RTOL, key
    assert [opt.state[p]["step"].item() for p in params] == [ref_opt.state[r]["step"].item() for r in ref]


@pytest.mark.parametrize("kwargs,backend", _config_params())
def test_follows_torch_adamw_for_torch_test_configs(kwargs, backend, gen, monkeypatch):
    use_backend(backend, monkeypatch)
    params, ref = make_pair(gen)
    opt = FusedAdamW(params, backend=backend, **kwargs)
    ref_opt = torch.optim.AdamW(ref, **kwargs)
    for _ in range(STEPS):
        set_grads(params, ref, gen)
        opt.step()
        ref_opt.step()
    assert_same_as_torch(opt, ref_opt, params, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_equals_clip_grad_norm_then_adamw(backend, gen, monkeypatch):
    use_backend(backend, monkeypatch)
    params, ref = make_pair(gen)
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=0.5, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    for i in range(STEPS):
        set_grads(params, ref, gen, scale=0.002 if i % 3 == 0 else 1.0)  # some steps below the threshold
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        opt.step()
        ref_opt.step()
        assert rel_err(opt.last_grad_norm, ref_norm) <= RTOL
    assert_same_as_torch(opt, ref_opt, params, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_its_settings_and_continues_exactly(backend, how, gen, monkeypatch):
    """A deepcopy or unpickled FusedAdamW clips, skips and counts exactly as the original does."""
    use_backend(backend, monkeypatch)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in ((8, 5), (5,), (300,))]
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=0.5, backend=backend)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()  # skipped: counted
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    model_copy = copy.deepcopy({"params": params, "opt": opt})
    if how == "pickle":
        model_copy = pickle.loads(pickle.dumps(model_copy))
    twin, twin_params = model_copy["opt"], model_copy["params"]
    assert (twin.max_grad_norm, twin.backend, int(twin.skipped_steps)) == (0.5, backend, 1)
    for bad in (False, True, False):
        for p, q in zip(params, twin_params, strict=True):
            g = torch.full_like(p, float("inf")) if bad else torch.randn(p.shape, generator=gen) * 10
            p.grad, q.grad = g, g.clone()  # large enough to be clipped
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)
    assert int(twin.skipped_steps) == int(opt.skipped_steps) == 2
    torch.testing.assert_close(twin.last_grad_norm, opt.last_grad_norm, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_grad_skips_without_host_sync(backend, bad, gen, monkeypatch):
    use_backend(backend, monkeypatch)
    params, ref = make_pair(gen)
    opt = FusedAdamW(params, lr=1e-2, amsgrad=True, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, amsgrad=True)
    for _ in range(2):
        set_grads(params, ref, gen)
        opt.step()
        ref_opt.step()
    before_p = [p.detach().clone() for p in params]
    before_s = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]

    set_grads(params, ref, gen)
    params[0].grad[17] = bad
    syncs: list[str] = []
    for name in ("item", "cpu", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(tensor, *args, _original=original, _name=name, **kw):
            syncs.append(_name)
            return _original(tensor, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)
    opt.step()
    monkeypatch.undo()  # restores the Tensor methods (and the interpreter variable)
    use_backend(backend, monkeypatch)
    assert syncs == []
    for p, old, old_state in zip(params, before_p, before_s):
        assert torch.equal(p.detach(), old)
        for key, value in old_state.items():
            assert torch.equal(opt.state[p][key], value), key
    assert not torch.isfinite(opt.last_grad_norm)
    # ... but the skip itself is counted, on the device, with no guard installed.
    assert opt.skipped_steps.dtype == torch.int64 and opt.skipped_steps.device == params[0].device
    assert opt.skipped_steps.item() == 1

    # The skipped step did not count: the next finite step continues exactly like torch's.
    set_grads(params, ref, gen)
    opt.step()
    ref_opt.step()
    assert_same_as_torch(opt, ref_opt, params, ref)
    assert opt.skipped_steps.item() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_deferred_scale_and_skip(backend, gen, monkeypatch):
    use_backend(backend, monkeypatch)
    params, ref = make_pair(gen)
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=1.0, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    set_grads(params, ref, gen)
    opt.defer_grad_scale(torch.tensor(0.25))
    for r in ref:
        r.grad.mul_(0.25)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)  # the kit's own clip applies to the deferred-scaled grads
    opt.step()
    ref_opt.step()
    assert_same_as_torch(opt, ref_opt, params, ref)

    before = [p.detach().clone() for p in params]
    set_grads(params, ref, gen)
    opt.defer_skip(torch.tensor(True))
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(opt.state[p]["step"].item() == 1 for p in params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_use_fp32_moments_and_match_across_backends(dtype, gen, monkeypatch):
    use_backend("triton", monkeypatch)
    params32 = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(3)]
    results = {}
    for b in BACKENDS:
        params = [p.to(dtype).requires_grad_() for p in params32]
        opt = FusedAdamW(params, lr=1e-2, max_grad_norm=1.0, backend=b)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(dtype)
            opt.step()
        assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)
        results[b] = [p.detach() for p in params]
    # Same fp32 math and round-to-nearest-even stores, but each backend rounds its fp32 intermediates in its own
    # order: an element whose result lands on a rounding boundary can differ by one unit in the last place (measured:
    # 1 element of 4,186 in 2 of 80 seeds). Everything else is bit-equal.
    eps = torch.finfo(dtype).eps
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=eps, atol=torch.finfo(dtype).tiny)
        assert (a != b).sum() <= max(1, a.numel() // 500)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_keeps_updates_below_half_a_bf16_ulp(backend, monkeypatch):
    """Both paths round bf16 params stochastically: Triton's kernel, and on the torch path the lean step."""
    use_backend(backend, monkeypatch)
    n, lr = 8192, 1e-3  # the bf16 ulp just below 1.0 is 2**-8 ~ 3.9e-3: a step of 1e-3 rounds back to 1.0

    def run(stochastic: bool, steps: int) -> torch.Tensor:
        p = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
        opt = FusedAdamW([p], lr=lr, weight_decay=0.0, backend=backend, stochastic_rounding=stochastic)
        for _ in range(steps):
            p.grad = torch.ones(n, dtype=torch.bfloat16)  # Adam's step is then lr per element
            opt.step()
        return p.detach().double()

    assert torch.equal(run(False, 3), torch.ones(n, dtype=torch.float64))  # nearest rounding loses them
    for steps in (1, 3):
        values = run(True, steps)
        # Unbiased: the mean moves by lr per step (std of the mean ~2e-5 for 8192 elements).
        assert abs(values.mean().item() - (1.0 - steps * lr)) < 1.5e-4
        assert set(values.unique().tolist()) <= {1.0, 1.0 - 2**-8, 1.0 - 2 * 2**-8, 1.0 - 3 * 2**-8}


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_interchange_with_torch_adamw(backend, gen, monkeypatch, tmp_path):
    use_backend(backend, monkeypatch)
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    params, ref = make_pair(gen)
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(6)]

    def run(opt, ps, steps):
        for step_grads in steps:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()

    # torch -> kit: torch runs 3 steps, its checkpoint (written to disk) continues in FusedAdamW.
    torch_opt = torch.optim.AdamW(ref, **kwargs)
    run(torch_opt, ref, grads[:3])
    torch.save(torch_opt.state_dict(), tmp_path / "torch.pt")
    with torch.no_grad():
        for p, r in zip(params, ref):
            p.copy_(r)
    kit = FusedAdamW(params, backend=backend, **kwargs)
    kit.load_state_dict(torch.load(tmp_path / "torch.pt"))
    run(kit, params, grads[3:])
    run(torch_opt, ref, grads[3:])
    assert_same_as_torch(kit, torch_opt, params, ref)
    assert set(kit.state_dict()["param_groups"][0]) == set(torch_opt.state_dict()["param_groups"][0])

    # kit -> torch: FusedAdamW's checkpoint continues in torch.optim.AdamW.
    torch.save(kit.state_dict(), tmp_path / "kit.pt")
    fresh = [p.detach().clone().requires_grad_() for p in params]
    torch_again = torch.optim.AdamW(fresh, **kwargs)
    torch_again.load_state_dict(torch.load(tmp_path / "kit.pt"))
    run(torch_again, fresh, grads[:2])
    run(kit, params, grads[:2])
    assert rel_err(flat(params), flat(fresh)) <= RTOL
    assert all(kit.state[p]["step"].item() == torch_again.state[f]["step"].item() == 8
               for p, f in zip(params, fresh))


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_round_trip_keeps_fp32_moments_of_bf16_params(backend, gen, monkeypatch, tmp_path):
    use_backend(backend, monkeypatch)
    params = [torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in SHAPES]
    opt = FusedAdamW(params, lr=1e-2, amsgrad=True, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "kit.pt")
    restored = FusedAdamW(params, lr=1e-2, amsgrad=True, backend=backend)
    restored.load_state_dict(torch.load(tmp_path / "kit.pt"))
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert restored.state[p][key].dtype == torch.float32
            assert torch.equal(restored.state[p][key], opt.state[p][key])
        assert restored.state[p]["step"].item() == 2


def test_grad_scaler_hands_scale_and_found_inf_to_the_step(gen):
    params, ref = make_pair(gen)
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert opt._step_supports_amp_scaling
    for i in range(3):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        if i == 1:
            grads[1][0, 0] = float("inf")
        for p in params:
            p.grad = None
        loss = sum((p * g).sum() for p, g in zip(params, grads))  # d loss / d p = g
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if i != 1:
            for r, g in zip(ref, grads):
                r.grad = g.clone()
            torch.nn.utils.clip_grad_norm_(ref, 1.0)
            ref_opt.step()
    assert scaler.get_scale() == 512.0  # the inf step was reported back to the scaler
    assert_same_as_torch(opt, ref_opt, params, ref)


@pytest.mark.parametrize(("key", "value"), [("max_grad_norm", 1.0), ("backend", "torch"),
                                            ("stochastic_rounding", True)])
def test_param_groups_cannot_set_optimizer_wide_options(key, value):
    """One clip over all groups, one backend, one rounding mode: a group setting one would be ignored."""
    first, second = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    with pytest.raises(SpecError, match=f"param group {key}.*set {key} once on FusedAdamW"):
        FusedAdamW([{"params": [first], key: value}])
    opt = FusedAdamW([first])
    with pytest.raises(SpecError, match=f"param group {key}"):
        opt.add_param_group({"params": [second], key: value})
    assert len(opt.param_groups) == 1 and key not in opt.defaults
    opt.add_param_group({"params": [second], "lr": 0.5})  # per-group hyperparameters still work
    assert opt.param_groups[1]["lr"] == 0.5


def test_construction_errors_name_field_and_fix():
    p = [nn.Parameter(torch.randn(2))]
    with pytest.raises(SpecError, match="max_grad_norm=-1.0"):
        FusedAdamW(p, max_grad_norm=-1.0)
    with pytest.raises(SpecError, match=r"betas\[1\]=1.5"):
        FusedAdamW(p, betas=(0.9, 1.5))
    with pytest.raises(SpecError, match="backend='cuda'"):
        FusedAdamW(p, backend="cuda")
    with pytest.raises(SpecError, match="TRITON_INTERPRET=1"):
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("interpreter enabled in this process")
        FusedAdamW(p, backend="triton")


def test_registry_and_env_override_log_the_path(monkeypatch, caplog, gen):
    assert resolve_optimizer("fused_adamw") is FusedAdamW
    use_backend("triton", monkeypatch)
    monkeypatch.setenv("LIGHTNING_OPTKIT_BACKEND", "triton")
    params, ref = make_pair(gen)
    opt = FusedAdamW(params)
    set_grads(params, ref, gen)
    with caplog.at_level(logging.DEBUG, logger="lightning_optkit.kernels"):
        opt.step()
    assert "FusedAdamW: adamw/triton path for torch.float32 tensors on cpu" in caplog.text
    monkeypatch.setenv("LIGHTNING_OPTKIT_BACKEND", "torch")
    with caplog.at_level(logging.DEBUG, logger="lightning_optkit.kernels"):
        opt.step()
    assert "adamw/torch path" in caplog.text


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return FusedAdamW(self.parameters(), lr=1e-2, max_grad_norm=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trainer_fit_lowers_the_loss(precision, quiet_trainer_kwargs, gen):
    x = torch.randn(256, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen) + 0.1 * torch.randn(256, 1, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model = _Regression()
    with torch.no_grad():
        before = nn.functional.mse_loss(model.net(x), y).item()
    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=40, precision=precision)
    trainer.fit(model, loader)
    with torch.no_grad():
        after = nn.functional.mse_loss(model.net(x), y).item()
    assert after < 0.5 * before
    opt = trainer.optimizers[0]
    assert isinstance(opt, FusedAdamW)
    assert all(s["step"].item() == 40 for s in opt.state.values())


def test_interpreter_mode_stays_inside_the_kit(gen, monkeypatch):
    """Running the kit's kernels interpreted leaves triton's process-wide mode (other modules') alone."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs all of triton interpreted")
    use_backend("triton", monkeypatch)
    params, ref = make_pair(gen)
    set_grads(params, ref, gen)
    FusedAdamW(params, backend="triton").step()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton.knobs.runtime.interpret

    def other_module_kernel(x):
        pass

    assert type(triton.jit(other_module_kernel)).__name__ == "JITFunction"


# ------------------------------------------------------------------ Trainer(gradient_clip_val) under mixed precision
def _spec_module(optimizer: str, **kwargs):
    from lightning_optkit import OptimizerMixin, OptimizerSpec

    class Regression(OptimizerMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(8, 1)
            self.optim_spec = OptimizerSpec(optimizer, lr=1e-2, **kwargs)
            self.batches = 0

        def training_step(self, batch, batch_idx):
            self.batches += 1
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

    return Regression()


def _loader(gen) -> torch.utils.data.DataLoader:
    x = torch.randn(32, 8, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


@pytest.mark.parametrize(("optimizer", "kwargs", "fix"), [
    ("fused_adamw", {}, r"set max_grad_norm: 0\.5 in the spec.*GradientClipping\(max_norm=0\.5\)"),
    ("adamw", {"fused": True}, r"add GradientClipping\(max_norm=0\.5\)"),
])
def test_gradient_clip_val_with_a_fused_optimizer_under_bf16_mixed_fails_before_training(
        optimizer, kwargs, fix, quiet_trainer_kwargs, gen):
    model = _spec_module(optimizer, **kwargs)
    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=2, precision="bf16-mixed", gradient_clip_val=0.5)
    with pytest.raises(SpecError, match=r"Trainer\(gradient_clip_val\)=0\.5 cannot clip .* under "
                                        r"precision='bf16-mixed'.*Fix: remove gradient_clip_val and " + fix):
        trainer.fit(model, _loader(gen))
    assert model.batches == 0


@pytest.mark.parametrize("how", ["max_grad_norm", "GradientClipping", "32-true"])
def test_the_suggested_fixes_train(how, quiet_trainer_kwargs, gen):
    from lightning_optkit.callbacks import GradientClipping

    model = _spec_module("fused_adamw", **({"max_grad_norm": 0.5} if how == "max_grad_norm" else {}))
    kwargs = {"precision": "bf16-mixed"}
    if how == "GradientClipping":
        kwargs["callbacks"] = [GradientClipping(max_norm=0.5)]
    if how == "32-true":  # Lightning clips FusedAdamW itself at full precision
        kwargs = {"precision": "32-true", "gradient_clip_val": 0.5}
    trainer = L.Trainer(**quiet_trainer_kwargs, max_steps=3, **kwargs)
    trainer.fit(model, _loader(gen))
    assert model.batches == 3 and trainer.global_step == 3


def test_load_state_dict_keeps_the_optimizer_wide_settings(gen):
    """torch's load_state_dict calls __setstate__ with state and groups only: clipping (and the rest)
    must survive it, or a resumed run would silently stop clipping."""
    p = nn.Parameter(torch.randn(8, generator=gen))
    opt = FusedAdamW([p], max_grad_norm=0.5, rounding_seed=5, stochastic_rounding=True)
    p.grad = torch.randn(8, generator=gen)
    opt.step()
    again = FusedAdamW([p], max_grad_norm=0.5, rounding_seed=5, stochastic_rounding=True)
    again.load_state_dict(opt.state_dict())
    assert (again.max_grad_norm, again.rounding_seed, again.stochastic_rounding) == (0.5, 5, True)
