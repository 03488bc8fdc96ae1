"""Foreach path vs per-parameter loop of the same update rule, for every kit optimizer, on CPU.

Both paths are the same optimizer class and rule: ``foreach=True`` runs the rule once per
(device, dtype) bucket, ``foreach=False`` runs it once per parameter. torch's own SGD and AdamW are
measured the same way in the same run as the baseline. Timings are medians over many repeats of
one ``optimizer.step()``, after warm-up, with the two paths interleaved so machine noise hits both.

A second table measures the guarded step: a skip flag deferred before every step (false, as
NonFiniteGuard hands over on a healthy step), on the foreach path and, where the optimizer has a fused
kernel, with ``fused=True`` (the kernel applies the skip inside its one pass), plus the unguarded fused
step, each against the plain foreach step of the same optimizer in the same run.

Usage: python benchmarks/bench_foreach.py [--params 200] [--repeats 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_optkit.optim.adan import Adan
from lightning_optkit.optim.lamb import LAMB
from lightning_optkit.optim.lion import Lion
from lightning_optkit.optim.momentum_sgd import MomentumSGD
from lightning_optkit.optim.schedulefree import ScheduleFreeAdamW

OptimizerFactory = Callable[[list[torch.Tensor], bool], torch.optim.Optimizer]

CASES: list[tuple[str, OptimizerFactory]] = [
    ("torch SGD(momentum)", lambda ps, fe: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=fe)),
    ("torch AdamW", lambda ps, fe: torch.optim.AdamW(ps, lr=1e-3, foreach=fe)),
    ("MomentumSGD", lambda ps, fe: MomentumSGD(ps, lr=1e-3, momentum=0.9, foreach=fe)),
    ("Lion", lambda ps, fe: Lion(ps, lr=1e-4, weight_decay=0.1, foreach=fe)),
    ("LAMB", lambda ps, fe: LAMB(ps, lr=1e-3, foreach=fe)),
    ("Adan", lambda ps, fe: Adan(ps, lr=1e-3, weight_decay=0.02, foreach=fe)),
    ("ScheduleFreeAdamW", lambda ps, fe: ScheduleFreeAdamW(ps, lr=1e-3, weight_decay=0.01, foreach=fe)),
]


def mixed_shapes(count: int, widths: list[int], gen: torch.Generator) -> list[tuple[int, ...]]:
    """``count`` shapes: weight matrices (out, in) with random widths, each followed by its bias."""
    shapes: list[tuple[int, ...]] = []
    while len(shapes) < count:
        out_dim, in_dim = (widths[int(i)] for i in torch.randint(0, len(widths), (2,), generator=gen))
        shapes.append((out_dim, in_dim))
        if len(shapes) < count:
            shapes.append((out_dim,))
    return shapes


def time_steps(optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def time_guarded_step(optimizer: torch.optim.Optimizer) -> float:
    """One step with a (false) skip flag deferred first, as NonFiniteGuard does on every step."""
    start = time.perf_counter()
    optimizer.defer_skip(torch.zeros((), dtype=torch.bool))
    optimizer.step()
    return time.perf_counter() - start


GUARDED: list[tuple[str, Callable[..., torch.optim.Optimizer], dict]] = [
    ("MomentumSGD", MomentumSGD, dict(lr=1e-3, momentum=0.9)),
    ("Lion", Lion, dict(lr=1e-4, weight_decay=0.1)),
    ("LAMB", LAMB, dict(lr=1e-3)),
    ("Adan", Adan, dict(lr=1e-3, weight_decay=0.02)),
    ("ScheduleFreeAdamW", ScheduleFreeAdamW, dict(lr=1e-3, weight_decay=0.01)),
]


def guarded_table(shapes: list[tuple[int, ...]], gen: torch.Generator, repeats: int, warmup: int) -> None:
    """Foreach vs fused step, each plain and guarded, same optimizer, interleaved; ratios vs plain foreach."""
    columns = [("plain", "foreach"), ("guard", "+guard"), ("fused", "fused"), ("fused_guard", "fused+guard")]
    header = f"{'optimizer':<20}" + "".join(f" {label + ' ms':>15}" for _, label in columns)
    header += "".join(f" {label + '/foreach':>19}" for _, label in columns[1:]) + f" {'fused+guard/+guard':>19}"
    print("\nGuarded step (a deferred skip flag every step, as NonFiniteGuard), foreach vs fused kernel")
    print(header)
    print("-" * len(header))
    for name, cls, kwargs in GUARDED:
        variants = {"plain": (dict(foreach=True), time_steps), "guard": (dict(foreach=True), time_guarded_step)}
        if cls.fused_step is not None:
            variants["fused"] = (dict(fused=True), time_steps)
            variants["fused_guard"] = (dict(fused=True), time_guarded_step)
        runs = {}
        for key, (extra, timer) in variants.items():
            params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            runs[key] = (cls(params, **kwargs, **extra), timer)
        times: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(warmup):
            for optimizer, timer in runs.values():
                timer(optimizer)
        for _ in range(repeats):
            for key, (optimizer, timer) in runs.items():
                times[key].append(timer(optimizer))
        ms = {key: statistics.median(values) * 1e3 for key, values in times.items()}
        row = f"{name:<20}" + "".join(f" {ms[key]:15.2f}" if key in ms else f" {'-':>15}" for key, _ in columns)
        row += "".join(f" {ms[key] / ms['plain']:18.2f}x" if key in ms else f" {'-':>19}" for key, _ in columns[1:])
        row += f" {ms['fused_guard'] / ms['guard']:18.2f}x" if "fused_guard" in ms else f" {'-':>19}"
        print(row)
    print("x/foreach: step time / plain foreach step time (same optimizer, same run); < 1 is faster.")
    print("fused+guard/+guard: guarded fused step / guarded foreach step, the choice a guarded run makes.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--guarded-only", action="store_true", help="print only the guarded-step table")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64, 128],
                        help="layer widths to draw weight shapes from (default: a small-model mix)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    shapes = mixed_shapes(args.params, args.widths, gen)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"{len(shapes)} float32 parameters (widths {args.widths}), {numel / 1e6:.2f} M elements, CPU, "
          f"{args.threads} thread(s), "
          f"median of {args.repeats} steps after {args.warmup} warm-up steps\n")

    if args.guarded_only:
        guarded_table(shapes, gen, args.repeats, args.warmup)
        return
    rows = []
    for name, factory in CASES:
        runs = {}
        for foreach in (False, True):
            params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            runs[foreach] = factory(params, foreach)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.warmup):
            for optimizer in runs.values():
                optimizer.step()
        for _ in range(args.repeats):
            for foreach, optimizer in runs.items():
                times[foreach].append(time_steps(optimizer))
        loop_ms = statistics.median(times[False]) * 1e3
        foreach_ms = statistics.median(times[True]) * 1e3
        rows.append((name, loop_ms, foreach_ms))

    torch_foreach = {name: fe for name, _, fe in rows if name.startswith("torch")}
    header = f"{'optimizer':<20} {'loop ms':>9} {'foreach ms':>11} {'loop/foreach':>13} {'vs torch foreach':>17}"
    print(header)
    print("-" * len(header))
    for name, loop_ms, foreach_ms in rows:
        baseline = torch_foreach["torch SGD(momentum)" if name == "MomentumSGD" else "torch AdamW"]
        versus = "" if name.startswith("torch") else f"{foreach_ms / baseline:16.2f}x"
        print(f"{name:<20} {loop_ms:9.2f} {foreach_ms:11.2f} {loop_ms / foreach_ms:12.2f}x {versus:>17}")
    print("\nloop/foreach: speedup of the foreach path over the per-parameter loop of the same rule.")
    print("vs torch foreach: kit foreach time / torch foreach time (MomentumSGD vs SGD, others vs AdamW).")
    guarded_table(shapes, gen, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
