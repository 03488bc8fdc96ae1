"""CPU benchmark: FusedAdamW (torch backend) against torch's own AdamW paths, same run, same tensors.

Prints a table of median step times (ms) and ratios. Sizes: 8 tensors of 4M plus 200 of 1k fp32
(~33.8M params); ``--quick`` uses 8 x 256k + 200 x 1k. Cases (each optimizer has its own state, all
share the parameters and gradients; steps are interleaved so machine noise hits every case alike):

* ``kit clip``:    FusedAdamW(max_grad_norm=1.0).step()
* ``torch clip``:  clip_grad_norm_(foreach=True) + AdamW(fused=True).step()
* ``kit``:         FusedAdamW().step()  (still checks gradients for inf/nan: one norm pass)
* ``kit flagged``:  FusedAdamW().step() after ``defer_skip(flag)``, as when a NonFiniteGuard (or
  GradScaler) has already checked the gradients: the step itself, with no norm pass
* ``torch fused``: AdamW(fused=True).step()
* ``torch foreach``: AdamW(foreach=True).step()

Run: ``python benchmarks/bench_fused_cpu.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from lightning_optkit.optim.fused_adamw import FusedAdamW


def make_params(big: int, n_big: int = 8, n_small: int = 200, small: int = 1024) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sizes = [big] * n_big + [small] * n_small
    params = [torch.randn(n, generator=gen).requires_grad_() for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small size (8 x 256k + 200 x 1k)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 9, quick 25)")
    args = parser.parse_args()
    os.environ.pop("LIGHTNING_OPTKIT_BACKEND", None)
    repeats = args.repeats or (25 if args.quick else 9)
    params = make_params(256 * 1024 if args.quick else 4 * 1024 * 1024)
    n = sum(p.numel() for p in params)

    kit_clip = FusedAdamW(params, lr=1e-4, max_grad_norm=1.0, backend="torch")
    kit = FusedAdamW(params, lr=1e-4, backend="torch")
    kit_flagged = FusedAdamW(params, lr=1e-4, backend="torch")
    no_skip = torch.tensor(False)

    def flagged_step() -> None:
        kit_flagged.defer_skip(no_skip)
        kit_flagged.step()
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    fused_for_clip = torch.optim.AdamW(params, lr=1e-4, fused=True)
    foreach = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def torch_clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        fused_for_clip.step()

    cases = {
        "kit clip": kit_clip.step,
        "torch clip": torch_clip,
        "kit": kit.step,
        "kit flagged": flagged_step,
        "torch fused": fused.step,
        "torch foreach": foreach.step,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up: state allocation, first-call costs
        fn()
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    med = {name: statistics.median(t) for name, t in times.items()}

    print(f"# FusedAdamW CPU benchmark: {n / 1e6:.1f}M fp32 params in {len(params)} tensors, "
          f"median of {repeats} steps")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'case':<16}{'median ms':>11}{'min ms':>9}")
    for name in cases:
        print(f"{name:<16}{med[name]:>11.2f}{min(times[name]):>9.2f}")
    print()
    print(f"{'comparison':<36}{'speedup':>8}{'target':>9}")
    rows = [
        ("kit clip vs clip_grad_norm_+fused", med["torch clip"] / med["kit clip"], ">= 1.25"),
        ("kit vs torch fused", med["torch fused"] / med["kit"], ">= 1.00"),
        ("kit vs torch foreach", med["torch foreach"] / med["kit"], ">= 3.00"),
        ("kit flagged vs torch fused", med["torch fused"] / med["kit flagged"], "(info)"),
        ("kit flagged vs torch foreach", med["torch foreach"] / med["kit flagged"], "(info)"),
    ]
    for label, ratio, target in rows:
        print(f"{label:<36}{ratio:>7.2f}x{target:>9}")


if __name__ == "__main__":
    main()
