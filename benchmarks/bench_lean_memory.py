"""Measured memory of lean optimizer state: bytes per parameter of the state and of the whole step.

A 50.4M-parameter model (12 x Linear(2048, 2048)) takes two FusedAdamW steps in a fresh process per
configuration. Two measurements, neither computed from a formula:

* ``state (storage)``: the bytes of the storages the optimizer's state tensors actually hold.
* ``RSS``: the process's resident memory from the operating system (``/proc/self/statm``, after
  ``malloc_trim``; allocations above 64 KiB mmapped, so freed tensors leave it): before the model
  exists (after a warm-up at 1/64 of the size has loaded the code and threads the step uses), with
  weights and gradients, after the steps (the state added), and the peak during the steps
  (``ru_maxrss``: includes the step's temporaries).

Configurations: fp32 weights with fp32 / bf16 / int8 state, and bf16 weights with int8 state
(stochastic rounding of the bf16 weight updates). Targets: int8 state <= 2.1 B/param; bf16 weights +
grads + int8 state <= 6.1 B/param.

Run: ``python benchmarks/bench_lean_memory.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys

CONFIGS = {
    "fp32 weights, fp32 state": ("float32", "float32"),
    "fp32 weights, bf16 state": ("float32", "bfloat16"),
    "fp32 weights, int8 state": ("float32", "int8"),
    "bf16 weights, int8 state": ("bfloat16", "int8"),
}
LAYERS, WIDTH = 12, 2048


def _rss() -> int:
    """Resident bytes now, after handing freed heap memory back to the OS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure(weights: str, state_dtype: str) -> dict[str, float]:
    """One configuration, in this process (called in a fresh child process)."""
    import torch

    from lightning_optkit.optim.fused_adamw import FusedAdamW

    torch.manual_seed(0)
    dtype = getattr(torch, weights)

    def train(layers: int, width: int) -> tuple[torch.nn.Module, FusedAdamW, int]:
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(dtype)
        model(torch.randn(2, width, dtype=dtype)).square().mean().backward()
        opt = FusedAdamW(model.parameters(), lr=1e-4, state_dtype=state_dtype,
                         stochastic_rounding=weights == "bfloat16")
        return model, opt, _rss()

    # Warm-up at 1/64 of the size: loads the code pages and thread pools the step uses, a fixed cost
    # that is not per parameter, before the baseline is read.
    warm_model, warm_opt, _ = train(2, WIDTH // 8)
    warm_opt.step()
    del warm_model, warm_opt
    base = _rss()
    model, opt, with_grads = train(LAYERS, WIDTH)
    n = sum(p.numel() for p in model.parameters())
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(2):
        opt.step()
    after = _rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return {
        "params": n,
        "state_storage": _storage_bytes(state) / n,
        "weights_storage": _storage_bytes(list(model.parameters())) / n,
        "grads_storage": _storage_bytes([p.grad for p in model.parameters()]) / n,
        "state_rss": (after - with_grads) / n,
        "step_rss": (after - base) / n,
        "peak_rss": (max(peak, peak_before) - base) / n,
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        # Allocations above 64 KiB always come from mmap and go back to the OS when freed, so the
        # resident size follows the live tensors (glibc otherwise raises this threshold as it goes).
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        print(json.dumps(measure(sys.argv[2], sys.argv[3])))
        return
    print(f"{'configuration':26s} {'state':>7s} {'state':>7s} {'weights+grads+state':>20s} {'peak in step':>13s}")
    print(f"{'':26s} {'storage':>7s} {'RSS':>7s} {'RSS':>20s} {'RSS':>13s}   (bytes per parameter)")
    results = {}
    for label, (weights, state_dtype) in CONFIGS.items():
        out = subprocess.run([sys.executable, __file__, "--child", weights, state_dtype], capture_output=True,
                             text=True, check=True)
        r = results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label:26s} {r['state_storage']:7.3f} {r['state_rss']:7.3f} {r['step_rss']:20.3f} "
              f"{r['peak_rss']:13.3f}")
    n = results["fp32 weights, int8 state"]["params"]
    int8 = results["fp32 weights, int8 state"]
    lean = results["bf16 weights, int8 state"]
    print(f"\n{n / 1e6:.1f}M parameters. int8 state: {int8['state_storage']:.3f} B/param by storage, "
          f"{int8['state_rss']:.3f} by RSS (target <= 2.1): {'met' if int8['state_rss'] <= 2.1 else 'NOT met'}")
    print(f"bf16 weights + grads + int8 state: {lean['step_rss']:.3f} B/param by RSS (target <= 6.1): "
          f"{'met' if lean['step_rss'] <= 6.1 else 'NOT met'}; peak during the step {lean['peak_rss']:.3f}")


if __name__ == "__main__":
    main()
