"""Real 2-process DDP (gloo, CPU) with the mixin, a kit schedule, FusedAdamW and the kit callbacks.

Each DDP fit runs in a fresh Python process (tests/ddp_scripts/run_fit.py): Lightning's ``strategy="ddp"``
starts the other rank by re-running the command line, which must not be pytest. Each rank saves its
final state; the tests compare the full states of both ranks exactly.
"""

from __future__ import annotations

import csv
import gc
import math
import os

import ddp_helpers as h
import pytest
import torch

from lightning_optkit import SpecError
from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard
from lightning_optkit.callbacks.monitor import OptimizerMonitor
from lightning_optkit.distributed import OverlapDDPStrategy, OverlapState

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return h.shared_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same run in one process, on the same global batches."""
    out = tmp_path_factory.mktemp("single")
    trainer = h.trainer(out, 1, callbacks=h.kit_callbacks())
    model = h.TinyNet(optim=h.SPEC, nan_step=h.NAN_STEP)
    trainer.fit(model, h.loader(0, 1))
    return h.final_state(trainer, model)


def test_ranks_end_bit_identical_and_equal_to_one_process_on_the_global_batch(runs, single) -> None:
    rank0, rank1 = h.load_ranks(runs / "kit")
    assert rank0["global_step"] == h.MAX_STEPS
    # Parameters, FusedAdamW state, schedule, clipping and guard state, per-step norms: all bit-identical.
    rank0, rank1 = h.same_on_every_rank(rank0), h.same_on_every_rank(rank1)
    h.assert_identical(rank0, rank1)
    # ... and the comparison does catch a one-ulp divergence in a single parameter.
    diverged = {**rank1, "params": dict(rank1["params"])}
    w = diverged["params"]["head.weight"].clone()
    w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(math.inf))
    diverged["params"]["head.weight"] = w
    with pytest.raises(AssertionError, match="head.weight"):
        h.assert_identical(rank0, diverged)
    # One process on the same global batches gets the same parameters (sums in another order: 1e-6).
    h.assert_close(rank0["params"], single["params"], atol=1e-6)
    moved = max((single["params"][k] - h.TinyNet().state_dict()[k]).abs().max().item() for k in single["params"])
    assert moved > 1e-2  # the runs trained: agreement is not trivial
    assert rank0["scheduler"] == single["scheduler"]


def test_clipping_and_monitor_use_the_reduced_gradients_and_only_rank_zero_writes(runs, single) -> None:
    rank0, rank1 = h.load_ranks(runs / "kit")
    steps = [s for s, _, _ in rank0["norms"]]
    assert steps == list(range(h.MAX_STEPS))
    for (_, n0, _), (_, n1, _), (_, ns, _) in zip(rank0["norms"], rank1["norms"], single["norms"]):
        if math.isnan(ns):
            assert math.isnan(n0) and math.isnan(n1)
            continue
        assert n0 == n1  # clipping saw the same (reduced) gradient norm on both ranks
        assert n0 == pytest.approx(ns, rel=1e-5)  # ... the norm of the global-batch gradient
    # The monitor logged the same reduced norm, once per step, from rank 0 only.
    versions = sorted(p.name for p in (runs / "kit" / "logs").iterdir())
    assert versions == ["version_0"]
    with open(runs / "kit" / "logs" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("grad_norm/total")]
    logged = {int(r["step"]): float(r["grad_norm/total"]) for r in rows}
    assert len(rows) == len(logged) == h.MAX_STEPS
    for step, norm, _ in rank0["norms"]:
        assert logged[step] == pytest.approx(norm, rel=1e-5, nan_ok=True)
    # Checkpoints: written by rank 0's checkpoint IO only.
    expected = [f"step={s}.ckpt" for s in range(h.CKPT_EVERY, h.MAX_STEPS + 1, h.CKPT_EVERY)]
    assert rank0["saved_checkpoints"] == expected and rank1["saved_checkpoints"] == []
    assert sorted(os.listdir(runs / "kit" / "ckpt")) == sorted(expected)


def test_a_nan_on_one_rank_is_skipped_on_both(runs, single) -> None:
    rank0, rank1 = h.load_ranks(runs / "kit")
    for state in (rank0, rank1, single):
        skipped = [s for s, _, skip in state["norms"] if skip]
        assert skipped == [h.NAN_STEP]
        assert state["NonFiniteGuard"][0]["skipped"].item() == 1.0
        # the skipped step left FusedAdamW's step counters alone: one step fewer than the global step
        counts = {v["step"].item() for v in state["optimizer"]["state"].values()}
        assert counts == {h.MAX_STEPS - 1}
        assert all(torch.isfinite(p).all() for p in state["params"].values())
    h.assert_identical(rank0["params"], rank1["params"])


def test_overlap_hook_matches_plain_ddp_with_accumulation_and_schedule(runs) -> None:
    over0, over1 = h.load_ranks(runs / "overlap")
    plain0, plain1 = h.load_ranks(runs / "plain")
    h.assert_identical(h.same_on_every_rank(over0), h.same_on_every_rank(over1))
    h.assert_identical(h.same_on_every_rank(plain0), h.same_on_every_rank(plain1))
    h.assert_close(over0["params"], plain0["params"], atol=1e-6)
    h.assert_identical(over0["scheduler"], plain0["scheduler"])
    steps = h.OVERLAP_RUN["max_steps"]
    # The hook did the updates, in several buckets, once per optimizer step (never on no_sync micro-batches),
    # and Lightning's step added none: FusedAdamW's counters equal the number of optimizer steps.
    assert len(over0["buckets"]) >= 2
    assert steps < over0["bucket_updates"] <= steps * len(over0["buckets"])
    assert {v["step"].item() for v in over0["optimizer"]["state"].values()} == {float(steps)}
    h.assert_identical(over0["optimizer"]["param_groups"], plain0["optimizer"]["param_groups"])
    for key, value in over0["optimizer"]["state"].items():
        torch.testing.assert_close(value["exp_avg_sq"], plain0["optimizer"]["state"][key]["exp_avg_sq"],
                                   rtol=0, atol=1e-9)


@pytest.fixture
def no_launch_env():
    """Lightning's launcher exports MASTER_PORT, LOCAL_RANK...; keep them out of the test process.

    Restored (or removed) after the test: a LOCAL_RANK left behind would make every later DDP fit
    of this process, and every subprocess it starts, believe it was launched externally and wait for
    ranks that never come.
    """
    saved = {key: os.environ.pop(key, None) for key in h._LAUNCH_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize(("callbacks", "trainer_kwargs", "message"), [
    ([GradientClipping(max_norm=1.0)], {}, "clip_per='param' or 'bucket'"),
    ([GradientClipping(max_norm=1.0, per="param")], {}, "train without overlap"),
    ([NonFiniteGuard()], {}, "skip_non_finite=True"),
    ([], {"gradient_clip_val": 1.0}, "clip per parameter or per bucket"),
])
def test_overlap_refuses_global_clipping_and_skipping(no_launch_env, tmp_path, callbacks, trainer_kwargs,
                                                      message) -> None:
    trainer = h.trainer(tmp_path, 1, strategy=OverlapDDPStrategy(), callbacks=callbacks, checkpoints=False,
                        **trainer_kwargs)
    model = h.TinyNet(optim=h.SPEC)
    with pytest.raises(SpecError, match=message):
        trainer.fit(model, h.loader(0, 1))
    assert not torch.distributed.is_initialized()  # refused before any process group exists


def test_overlap_refuses_monitor_update_norms_and_bad_options(no_launch_env, tmp_path) -> None:
    trainer = h.trainer(tmp_path, 1, strategy=OverlapDDPStrategy(), callbacks=[OptimizerMonitor()],
                        checkpoints=False)
    with pytest.raises(SpecError, match=r"norms=\('grad',\)"):
        trainer.fit(h.TinyNet(optim=h.SPEC), h.loader(0, 1))
    with pytest.raises(SpecError, match="clip_per"):
        OverlapState(max_norm=1.0, clip_per="layer")
    with pytest.raises(SpecError, match="max_norm"):
        OverlapDDPStrategy(max_norm=-1.0)
    with pytest.raises(SpecError, match="ddp_comm_hook"):
        OverlapDDPStrategy(ddp_comm_hook=lambda s, b: None)
    with pytest.raises(SpecError, match="find_unused_parameters"):
        OverlapDDPStrategy(find_unused_parameters=True)


@pytest.mark.parametrize(("optim", "message"), [
    ({"optimizer": "adamw", "lr": 1e-2}, "fused_adamw"),
    ({"optimizer": "fused_adamw", "lr": 1e-2, "max_grad_norm": 1.0}, "max_grad_norm"),
])
def test_overlap_refuses_optimizers_it_cannot_apply_per_bucket(no_launch_env, tmp_path, optim, message) -> None:
    trainer = h.trainer(tmp_path, 1, strategy=OverlapDDPStrategy(), checkpoints=False)
    try:
        with pytest.raises(SpecError, match=message):
            trainer.fit(h.TinyNet(optim=optim), h.loader(0, 1))
    finally:  # the optimizer is known only after the (1-process) group was created
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize(("clip_per", "reference_clipping"), [
    ("param", GradientClipping(max_norm=0.05, per="param")),
    ("bucket", GradientClipping(max_norm=0.05)),  # one bucket holds every parameter: the global norm
])
def test_overlap_clipping_inside_the_hook_matches_callback_clipping(no_launch_env, tmp_path, clip_per,
                                                                    reference_clipping) -> None:
    strategy = OverlapDDPStrategy(max_norm=0.05, clip_per=clip_per)
    overlapped = h.TinyNet(optim=h.SPEC)
    try:
        trainer = h.trainer(tmp_path / "o", 1, strategy=strategy, checkpoints=False, max_steps=6)
        trainer.fit(overlapped, h.loader(0, 1))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert strategy.overlap.bucket_updates == 6 and len(strategy.overlap.last_bucket_norms) == 1
    reference = h.TinyNet(optim=h.SPEC)
    h.trainer(tmp_path / "r", 1, callbacks=[reference_clipping], checkpoints=False, max_steps=6).fit(
        reference, h.loader(0, 1))
    h.assert_close(overlapped.state_dict(), reference.state_dict(), atol=1e-6)
    unclipped = h.TinyNet(optim=h.SPEC)
    h.trainer(tmp_path / "u", 1, checkpoints=False, max_steps=6).fit(unclipped, h.loader(0, 1))
    drift = max((overlapped.state_dict()[k] - unclipped.state_dict()[k]).abs().max().item()
                for k in unclipped.state_dict())
    assert drift > 1e-4  # clipping was active


class _ScaledSum(torch.nn.Module):
    """``loss = sum(weight * x)``: the gradient of ``weight`` is ``x`` exactly."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * x).sum()


def test_overlap_hook_applies_fused_adamw_stochastic_rounding(tmp_path, monkeypatch) -> None:
    """bf16 steps below half an ulp survive in the hook too, with FusedAdamW's own seed sequence."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's CPU interpreter: the SR path needs Triton
    from torch.nn.parallel import DistributedDataParallel

    from lightning_optkit.distributed.overlap import overlap_hook
    from lightning_optkit.optim.fused_adamw import FusedAdamW

    n, lr = 4096, 1e-3  # a step of 1e-3 from 1.0 rounds back to 1.0 under round-to-nearest (ulp 2**-8)
    kwargs = dict(lr=lr, weight_decay=0.0, backend="triton", stochastic_rounding=True)
    torch.manual_seed(0)
    reference = _ScaledSum(n)
    reference_opt = FusedAdamW(reference.parameters(), **kwargs)
    torch.manual_seed(0)  # the same stochastic-rounding seed
    net = _ScaledSum(n)
    opt = FusedAdamW(net.parameters(), **kwargs)
    x = torch.ones(n, dtype=torch.bfloat16)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ddp = None
    try:
        state = OverlapState(skip_non_finite=False)
        state.attach(opt, net)
        ddp = DistributedDataParallel(net)
        ddp.register_comm_hook(state=state, hook=overlap_hook)
        for _ in range(3):
            state.armed = True
            ddp(x).backward()
            state.armed = False
            state.finish_step()
            opt.zero_grad()
            reference.weight.grad = x.clone()
            reference_opt.step()
            assert torch.equal(net.weight, reference.weight)
    finally:
        del ddp  # before its process group: a DDP reducer freed after it can hang (see test_lean_adamw)
        gc.collect()
        torch.distributed.destroy_process_group()
    assert state.bucket_updates == 3
    assert (net.weight != 1.0).any()  # rounding was stochastic: round-to-nearest would keep every 1.0
    assert abs(net.weight.double().mean().item() - (1.0 - 3 * lr)) < 1.5e-4  # and unbiased
