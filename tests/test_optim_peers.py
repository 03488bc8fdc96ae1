"""Kit optimizers against the libraries users would pick instead (the ``bench`` extra, installed by
scripts/test.sh so these run in CI), on fresh random inputs, each peer configured to compute the same rule.

Lion: pytorch-optimizer's and lion-pytorch's foreach Lion, bit for bit without weight decay (with it the kit
decays as ``p - (lr*wd)*p``, the peers as ``p * (1 - lr*wd)``: equal to float32 roundoff); lion-pytorch's
per-parameter Lion forms ``b1*m + (1-b1)*g`` by mul and add (not lerp): a sign can flip where the direction is
within roundoff of 0, so it is compared by the fraction of equal elements. Adan: pytorch-optimizer's
Adan (``weight_decouple=False``: the proximal decay). ScheduleFreeAdamW: schedulefree's AdamWScheduleFree.
LAMB: pytorch-optimizer's Lamb has no second-moment bias correction and no trust-ratio clamp; with eps=0 and
no clamp binding (weight norms below its 10), the trust ratio cancels any per-tensor scale of the direction (the
bias corrections), so the two agree to roundoff.
Large tensors are included so that the kit's cache-sized blocks (split tensors) are exercised.
"""

from __future__ import annotations

import pytest
import torch

from lightning_optkit.optim import LAMB, Adan, Lion, ScheduleFreeAdamW

po = pytest.importorskip("pytorch_optimizer", reason="the bench extra (peer libraries) is not installed")
schedulefree = pytest.importorskip("schedulefree", reason="the bench extra is not installed")
lion_pytorch = pytest.importorskip("lion_pytorch", reason="the bench extra is not installed")
lion_foreach = pytest.importorskip("lion_pytorch.foreach", reason="the bench extra is not installed")

STEPS = 8
SHAPES = [(300, 700), (7,), (5, 3), (130_001,), (64, 9)]  # 210k and 130k elements: cut into blocks on CPU


def run(make, start, grads, *, train: bool = False) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = make(params)
    if train:
        optimizer.train()
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach() for p in params]


def inputs(gen: torch.Generator, dtype: torch.dtype, scale: float = 0.05):
    start = [torch.randn(s, generator=gen, dtype=dtype) * scale for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(STEPS)]
    return start, grads


def assert_close(got, want, rel: float, what: str) -> None:
    for g, w in zip(got, want, strict=True):
        err = (g.double() - w.double()).abs().max()
        assert err <= rel * w.double().abs().max(), f"{what}: max error {err:.3g} vs scale {w.abs().max():.3g}"


PEER_LIONS = {
    "pytorch-optimizer": lambda ps, wd: po.Lion(ps, lr=3e-3, betas=(0.9, 0.99), weight_decay=wd),
    "lion-pytorch": lambda ps, wd: lion_pytorch.Lion(ps, lr=3e-3, betas=(0.9, 0.99), weight_decay=wd),
    "lion-pytorch-foreach": lambda ps, wd: lion_foreach.Lion(ps, lr=3e-3, betas=(0.9, 0.99), weight_decay=wd),
}


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("peer", sorted(PEER_LIONS))
def test_lion_is_the_peers_lion(peer, fused, gen):
    start, grads = inputs(gen, torch.float32)
    ours = run(lambda ps: Lion(ps, lr=3e-3, betas=(0.9, 0.99), fused=fused), start, grads)
    theirs = run(lambda ps: PEER_LIONS[peer](ps, 0.0), start, grads)
    for a, b in zip(ours, theirs):
        if peer == "lion-pytorch":
            assert (a == b).double().mean() > 0.999
        else:
            assert torch.equal(a, b)  # the same ops: bit for bit
    ours = run(lambda ps: Lion(ps, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=fused), start, grads)
    theirs = run(lambda ps: PEER_LIONS[peer](ps, 0.1), start, grads)
    if peer != "lion-pytorch":
        assert_close(ours, theirs, 1e-6, f"lion vs {peer} (weight decay)")


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 2e-6), (torch.float64, 1e-14)])
@pytest.mark.parametrize("no_prox", [False, True])
def test_adan_is_pytorch_optimizers_adan(no_prox, dtype, rel, gen):
    start, grads = inputs(gen, dtype)
    kw = dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02)
    ours = run(lambda ps: Adan(ps, no_prox=no_prox, **kw), start, grads)
    theirs = run(lambda ps: po.Adan(ps, weight_decouple=no_prox, max_grad_norm=0.0, **kw), start, grads)
    assert all(p.dtype == dtype for p in ours)
    assert_close(ours, theirs, rel, f"adan no_prox={no_prox} {dtype}")


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 2e-6), (torch.float64, 1e-14)])
def test_schedulefree_is_schedulefrees_adamw(dtype, rel, gen):
    start, grads = inputs(gen, dtype)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, warmup_steps=3, r=0.5,
              weight_lr_power=2.0)
    ours = run(lambda ps: ScheduleFreeAdamW(ps, **kw), start, grads)
    theirs = run(lambda ps: schedulefree.AdamWScheduleFree(ps, **kw, foreach=True), start, grads, train=True)
    assert_close(ours, theirs, rel, f"schedulefree {dtype}")


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_lamb_is_pytorch_optimizers_lamb_where_they_agree(dtype, rel, gen):
    start, grads = inputs(gen, dtype, scale=0.01)
    # eps=0 makes an exactly zero gradient element 0/0 in both rules (randn gives one in ~1.5% of seeds over
    # these 210k elements per step): move such elements off zero, identically for both optimizers.
    grads = [[torch.where(g == 0, 1e-6, g) for g in step] for step in grads]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)
    ours = run(lambda ps: LAMB(ps, max_trust_ratio=1e9, **kw), start, grads)
    theirs = run(lambda ps: po.Lamb(ps, weight_decouple=False, adam_debias=True, max_grad_norm=0.0, **kw),
                 start, grads)
    assert all(float(p.norm()) < 10 for p in ours)  # the peer clamps weight norms at 10: not binding here
    assert_close(ours, theirs, rel, f"lamb {dtype}")
