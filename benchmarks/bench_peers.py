"""Kit optimizers against the libraries users would pick instead, on the same parameters and gradients.

For each rule (Adan, ScheduleFreeAdamW, LAMB, Lion) the kit optimizer and its peers (pytorch-optimizer,
schedulefree, lion-pytorch, adan-pytorch; ``pip install 'lightning_optkit[bench]'``) each get their own
copy of the same starting parameters and gradients, and step in interleaved rounds (every optimizer once
per round, in a rotating order) so that machine noise hits all of them alike. Each peer runs in each of
its modes (foreach and per-parameter where it has both); the fastest peer mode is the bar.

Printed per (size, threads, rule): each optimizer's median step time and spread (25th-75th percentile),
its state bytes per parameter, the persistent buffers it keeps besides its state (scratch) per parameter,
and the bytes it allocates during one step per parameter (temporaries, from torch.profiler), and
``peer/kit``: the median over rounds of peer time / kit time (same round), with its 25th-75th percentile.
``>= 1.00`` means the kit is at least as fast. ``kit+guard`` is the kit step with a (false) skip flag
deferred before it, as NonFiniteGuard does every step; its row gives guarded / unguarded time (target <= 1.10).

Usage: python benchmarks/bench_peers.py [--rounds 9] [--sizes 20M:8 5M:50] [--threads 1 0] [--only adan lion]
(``--threads 0`` is torch's default thread count.)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

from lightning_optkit.extras import EXTRAS, require
from lightning_optkit.optim import LAMB, Adan, Lion, ScheduleFreeAdamW

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@dataclass
class Entry:
    """One optimizer configuration in a comparison."""

    name: str
    make: Factory
    kit: bool = False
    guarded: bool = False  # defer a (false) skip flag before each step
    mutates_grads: bool = False  # writes into p.grad: fresh gradients are copied in (untimed) before each step
    times: list[float] = field(default_factory=list)


def _peers():
    """Import the peer libraries (the ``bench`` extra; a missing one fails with a message naming the extra)."""
    feature = "benchmarks/bench_peers.py"
    po, sf, lp, ap = (require("bench", feature, name) for name in EXTRAS["bench"])
    require("bench", feature, "lion_pytorch.foreach")
    return po, sf, lp, ap


LR = {"adan": 1e-3, "schedulefree": 2.5e-3, "lamb": 1e-3, "lion": 1e-4}
WD = 0.02


def entries(rule: str) -> tuple[list[Entry], str]:
    """The kit optimizer, its guarded step and each peer mode for ``rule``, configured to compute the same
    update where the peer can; the note says where they differ."""
    po, sf, lp, ap = _peers()
    lr = LR[rule]
    if rule == "adan":
        kit = lambda ps: Adan(ps, lr=lr, weight_decay=WD)  # noqa: E731
        peers = [
            Entry("pytorch-optimizer foreach", lambda ps: po.Adan(ps, lr=lr, weight_decay=WD, weight_decouple=False,
                                                                   max_grad_norm=0.0, foreach=True)),
            Entry("pytorch-optimizer loop", lambda ps: po.Adan(ps, lr=lr, weight_decay=WD, weight_decouple=False,
                                                                max_grad_norm=0.0, foreach=False),
                  mutates_grads=True),
            # adan-pytorch writes betas as the paper does (1 - the reference code's betas)
            Entry("adan-pytorch", lambda ps: ap.Adan(ps, lr=lr, betas=(0.02, 0.08, 0.01), weight_decay=WD)),
        ]
        note = ("pytorch-optimizer (weight_decouple=False): the same rule (proximal decay). adan-pytorch skips the "
                "moment updates on its first step and mixes (1-b2)*d, per parameter only.")
    elif rule == "schedulefree":
        kit = lambda ps: ScheduleFreeAdamW(ps, lr=lr, weight_decay=WD)  # noqa: E731

        def sf_make(foreach: bool) -> Factory:
            def make(ps):
                opt = sf.AdamWScheduleFree(ps, lr=lr, weight_decay=WD, foreach=foreach)
                opt.train()
                return opt
            return make

        def po_make(ps):
            opt = po.ScheduleFreeAdamW(ps, lr=lr, weight_decay=WD)
            opt.train()
            return opt

        peers = [Entry("schedulefree foreach", sf_make(True), mutates_grads=True),
                 Entry("schedulefree loop", sf_make(False), mutates_grads=True),
                 Entry("pytorch-optimizer", po_make, mutates_grads=True)]
        note = "schedulefree and pytorch-optimizer divide p.grad in place (no temporary; .grad is overwritten)."
    elif rule == "lamb":
        kit = lambda ps: LAMB(ps, lr=lr, weight_decay=WD, max_trust_ratio=10.0)  # noqa: E731
        peers = [
            Entry("pytorch-optimizer foreach", lambda ps: po.Lamb(ps, lr=lr, weight_decay=WD, weight_decouple=False,
                                                                   adam_debias=True, max_grad_norm=0.0, foreach=True)),
            Entry("pytorch-optimizer loop", lambda ps: po.Lamb(ps, lr=lr, weight_decay=WD, weight_decouple=False,
                                                                adam_debias=True, max_grad_norm=0.0, foreach=False)),
        ]
        note = ("pytorch-optimizer's Lamb has no second-moment bias correction (one division less per element) and "
                "clamps the weight norm, not the ratio; configured with adam_debias=True, weight_decouple=False.")
    elif rule == "lion":
        kit = lambda ps: Lion(ps, lr=lr, weight_decay=WD)  # noqa: E731
        peers = [
            Entry("lion-pytorch", lambda ps: lp.Lion(ps, lr=lr, weight_decay=WD)),
            Entry("lion-pytorch foreach", lambda ps: lp.foreach.Lion(ps, lr=lr, weight_decay=WD)),
            Entry("pytorch-optimizer foreach", lambda ps: po.Lion(ps, lr=lr, weight_decay=WD, foreach=True)),
            Entry("pytorch-optimizer loop", lambda ps: po.Lion(ps, lr=lr, weight_decay=WD, foreach=False)),
        ]
        note = "All compute the reference rule (decoupled decay p*(1-lr*wd), sign of lerp(m, g, 1-b1))."
    else:
        raise ValueError(rule)
    first = [Entry("kit", kit, kit=True), Entry("kit+guard", kit, kit=True, guarded=True)]
    return first + peers, note


def make_tensors(numel: int, count: int, gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``count`` 2-d parameters of about ``numel / count`` elements each, and gradients for them."""
    per = numel // count
    rows = max(1, int(per**0.5))
    shapes = [(rows, per // rows)] * count
    params = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    return params, grads


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def scratch_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Persistent buffers besides the state (the kit's block buffers, LAMB's direction rows); 0 for peers."""
    return optimizer.scratch_nbytes() if hasattr(optimizer, "scratch_nbytes") else 0


def step_allocations(step: Callable[[], None]) -> int:
    """Bytes allocated by the ops of one step (torch.profiler's self CPU memory, summed over ops)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.events())


def run_rule(rule: str, numel: int, count: int, rounds: int, warmup: int, seed: int) -> None:
    group, note = entries(rule)
    gen = torch.Generator().manual_seed(seed)
    start, grads = make_tensors(numel, count, gen)
    total = sum(p.numel() for p in start)
    runs = []
    for entry in group:
        params = [torch.nn.Parameter(p.clone()) for p in start]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        runs.append((entry, params, entry.make(params)))

    def one_step(entry: Entry, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
        if entry.mutates_grads:
            for p, g in zip(params, grads):
                p.grad.copy_(g)
        if entry.guarded:
            flag = torch.zeros((), dtype=torch.bool)
            t0 = time.perf_counter()
            optimizer.defer_skip(flag)
        else:
            t0 = time.perf_counter()
        optimizer.step()
        return time.perf_counter() - t0

    for _ in range(warmup):
        for entry, params, optimizer in runs:
            one_step(entry, params, optimizer)
    allocated = {e.name: step_allocations(lambda e=e, ps=ps, o=o: one_step(e, ps, o)) for e, ps, o in runs}
    for r in range(rounds):
        order = runs[r % len(runs):] + runs[:r % len(runs)]
        for entry, params, optimizer in order:
            entry.times.append(one_step(entry, params, optimizer))

    kit = group[0]
    peers = [e for e in group if not e.kit]
    fastest = min(peers, key=lambda e: statistics.median(e.times))
    print(f"\n{rule}  ({total / 1e6:.1f}M params in {count} tensors, {torch.get_num_threads()} thread(s), "
          f"{rounds} rounds)")
    header = (f"  {'optimizer':<27} {'median ms':>10} {'p25-p75 ms':>16} {'state B/p':>9} {'scratch B/p':>11} "
              f"{'alloc B/p':>9}  ratio")
    print(header)
    for entry, _, optimizer in runs:
        ms = [t * 1e3 for t in entry.times]
        q = statistics.quantiles(ms, n=4)
        if entry is kit:
            ratio = ""
        elif entry.guarded:
            r_ = quartiles([g / k for g, k in zip(entry.times, kit.times)])
            ratio = f"guard/kit {r_[1]:.2f} ({r_[0]:.2f}-{r_[2]:.2f})"
        else:
            r_ = quartiles([p / k for p, k in zip(entry.times, kit.times)])
            ratio = f"peer/kit {r_[1]:.2f} ({r_[0]:.2f}-{r_[2]:.2f})" + (" <- fastest peer" if entry is fastest else "")
        print(f"  {entry.name:<27} {statistics.median(ms):10.1f} {q[0]:7.1f}-{q[2]:<8.1f} "
              f"{state_bytes(optimizer) / total:9.1f} {scratch_bytes(optimizer) / total:11.2f} "
              f"{allocated[entry.name] / total:9.2f}  {ratio}")
    print(f"  note: {note}")
    del runs
    gc.collect()


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def parse_size(text: str) -> tuple[int, int]:
    numel, count = text.split(":")
    scale = {"M": 1_000_000, "K": 1_000}.get(numel[-1].upper(), 1)
    return int(float(numel.rstrip("MmKk")) * scale), int(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=["20M:8", "5M:50"], help="NUMEL:TENSORS")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0: torch's default")
    parser.add_argument("--only", nargs="+", default=["adan", "schedulefree", "lamb", "lion"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, default threads {default_threads}")
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        for size in args.sizes:
            numel, count = parse_size(size)
            for rule in args.only:
                run_rule(rule, numel, count, args.rounds, args.warmup, args.seed)


if __name__ == "__main__":
    main()
