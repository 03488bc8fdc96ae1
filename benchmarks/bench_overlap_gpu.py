"""Step time of DDP training with and without the overlap hook, on CUDA (NCCL).

Run on one node with N GPUs:  ``torchrun --nproc_per_node=N benchmarks/bench_overlap_gpu.py``
(plain ``python benchmarks/bench_overlap_gpu.py`` runs one process). Prints, on rank 0, the median step
time (forward + backward + optimizer step) of each variant on the same model and data, and its ratio
to the torch baseline measured in the same run (``torch.optim.AdamW(fused=True)`` stepped after backward):

* ``torch AdamW(fused) after backward``: the baseline;
* ``kit FusedAdamW after backward``: the kit optimizer, no overlap;
* ``kit overlap_hook (per bucket)``: FusedAdamW updates applied in the DDP comm hook, per bucket.

Without a CUDA device it prints ``skipped: no CUDA device`` and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def _model(width: int, depth: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def _time_variant(name: str, args: argparse.Namespace, device: torch.device) -> float:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lightning_optkit.distributed import OverlapState, overlap_hook
    from lightning_optkit.optim.fused_adamw import FusedAdamW

    torch.manual_seed(0)
    model = _model(args.width, args.depth).to(device)
    ddp = DDP(model, device_ids=[device.index], bucket_cap_mb=args.bucket_mb)
    if name == "torch":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    else:
        opt = FusedAdamW(model.parameters(), lr=1e-4)
    state = None
    if name == "overlap":
        state = OverlapState(skip_non_finite=False)
        state.attach(opt, model)
        ddp.register_comm_hook(state, overlap_hook)
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randn(args.batch, 1, device=device)

    def step() -> None:
        if state is not None:
            state.armed = True  # OverlapDDPStrategy does this around Lightning's optimizer step
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        if state is not None:
            state.armed = False
        else:
            opt.step()
        opt.zero_grad(set_to_none=False)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / args.steps)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    try:
        results = {name: _time_variant(name, args, device) for name in ("torch", "kit", "overlap")}
    finally:
        dist.destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        labels = {"torch": "torch AdamW(fused) after backward", "kit": "kit FusedAdamW after backward",
                  "overlap": "kit overlap_hook (per bucket)"}
        base = results["torch"]
        print(f"{torch.cuda.get_device_name(device)}, world size {os.environ['WORLD_SIZE']}, MLP "
              f"{args.depth}x{args.width}, batch {args.batch}/rank, bucket {args.bucket_mb} MB, "
              f"median of {args.repeats} x {args.steps} steps")
        print(f"{'variant':40s} {'ms/step':>10s} {'vs torch':>9s}")
        for name, seconds in results.items():
            print(f"{labels[name]:40s} {seconds * 1e3:10.3f} {seconds / base:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
