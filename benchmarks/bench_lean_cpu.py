"""CPU step time of lean optimizer state against ``torch.optim.AdamW(fused=True)``, same run, same tensors.

Cases (each optimizer has its own state; all share parameters and gradients; steps are interleaved so
machine noise hits every case alike): torch ``AdamW(fused=True)``, FusedAdamW with fp32, bf16 and int8
state. Sizes: 8 x (1024, 1024) weights + 16 x 1024 biases (8.4M params); ``--quick``: 8 x (256, 1024).
Prints median ms per step and the ratio to torch's fused AdamW (above 1: slower).

Run: ``python benchmarks/bench_lean_cpu.py [--quick] [--repeats N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_optkit.optim.fused_adamw import FusedAdamW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = 256 if args.quick else 1024
    params = [torch.randn(rows, 1024, generator=gen).requires_grad_() for _ in range(8)]
    params += [torch.randn(1024, generator=gen).requires_grad_() for _ in range(16)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    n = sum(p.numel() for p in params)
    cases = {
        "torch AdamW(fused=True)": torch.optim.AdamW(params, lr=1e-5, fused=True),
        "FusedAdamW fp32 state": FusedAdamW(params, lr=1e-5, backend="torch"),
        "FusedAdamW bf16 state": FusedAdamW(params, lr=1e-5, backend="torch", state_dtype="bfloat16"),
        "FusedAdamW int8 state": FusedAdamW(params, lr=1e-5, backend="torch", state_dtype="int8"),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for opt in cases.values():
        opt.step()  # state created outside the timing
    for _ in range(args.repeats):
        for name, opt in cases.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch AdamW(fused=True)"])
    print(f"{n / 1e6:.1f}M params, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:26s} {1e3 * med:9.2f} ms   {med / base:6.2f}x torch fused")


if __name__ == "__main__":
    main()
