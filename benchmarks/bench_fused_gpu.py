"""GPU benchmark: Triton FusedAdamW step vs a device-to-device copy and torch's fused AdamW.

For fp32 and bf16 params (256M+ params in 64 tensors plus 200 small ones) prints median step times
(CUDA events), achieved bandwidth against a measured ``copy_`` of the same bytes (for the update
kernel alone: "flagged" hands in the skip flag, so no inf/nan norm pass runs), ratios against
``AdamW(fused=True)`` and ``clip_grad_norm_ + AdamW(fused=True)``, and the number of AdamW kernel
launches in one profiled step (expected: 1 per (device, dtype) group).
Exits 0 with "skipped: no CUDA device" where there is no GPU.

Run: ``python benchmarks/bench_fused_gpu.py [--params-m 256] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` CUDA-event-timed calls (after 3 warm-ups)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_launches(fn, name: str) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if name in e.key)


def bench_dtype(dtype: torch.dtype, n_params: int, repeats: int) -> None:
    from lightning_optkit.optim.fused_adamw import FusedAdamW

    big = n_params // 64
    params = [torch.randn(big, device="cuda", dtype=dtype).requires_grad_() for _ in range(64)]
    params += [torch.randn(1024, device="cuda", dtype=dtype).requires_grad_() for _ in range(200)]
    for p in params:
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in params)
    esize = params[0].element_size()
    # Bytes per param: read p, g, m, v (m, v fp32) and write p, m, v.
    step_bytes = n * (2 * esize + esize + 8 + 8)

    kit = FusedAdamW(params, lr=1e-4, backend="triton")
    kit_flagged = FusedAdamW(params, lr=1e-4, backend="triton")
    no_skip = torch.zeros((), dtype=torch.bool, device="cuda")

    def flagged_step() -> None:  # skip flag handed in (as by NonFiniteGuard): the update kernel alone
        kit_flagged.defer_skip(no_skip)
        kit_flagged.step()
    kit_clip = FusedAdamW(params, lr=1e-4, max_grad_norm=1.0, backend="triton")
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    fused_clip = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def torch_clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        fused_clip.step()

    src = torch.empty(step_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    results = {
        "copy (same bytes)": timed(lambda: dst.copy_(src), repeats),
        "kit triton": timed(kit.step, repeats),
        "kit triton flagged": timed(flagged_step, repeats),
        "kit triton clip": timed(kit_clip.step, repeats),
        "torch fused": timed(fused.step, repeats),
        "clip + torch fused": timed(torch_clip, repeats),
    }
    copy_bw = step_bytes / results["copy (same bytes)"] / 1e6
    print(f"\n## {dtype}: {n / 1e6:.0f}M params in {len(params)} tensors ({torch.cuda.get_device_name()})")
    print(f"{'case':<22}{'median ms':>10}{'GB/s':>9}")
    for name, ms in results.items():
        print(f"{name:<22}{ms:>10.3f}{step_bytes / ms / 1e6:>9.0f}")
    update_bw = step_bytes / results["kit triton flagged"] / 1e6
    print(f"update kernel bandwidth / copy:       {update_bw / copy_bw:.2f}  (kit triton flagged)")
    print(f"kit triton vs torch fused:            {results['torch fused'] / results['kit triton']:.2f}x")
    print(f"kit clip vs clip + torch fused:       {results['clip + torch fused'] / results['kit triton clip']:.2f}x")
    print(f"AdamW kernel launches in one step:    {kernel_launches(kit.step, '_adamw_kernel')} (expected 1)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=int, default=256, help="millions of params in the big tensors")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    for dtype in (torch.float32, torch.bfloat16):
        bench_dtype(dtype, args.params_m * 1_000_000, args.repeats)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
