"""Run one or more CPU fits (DDP when world > 1) and save each rank's final state; driven by the DDP tests.

Usage: python run_fit.py '<json list of run configs>'. Each config: ``name``, ``out`` (directory),
``world``, ``mode`` ("kit": the kit callbacks and a NaN batch; "overlap"/"plain": no step callbacks,
with/without the overlap hook), and optionally ``kill_at`` (SIGKILL at that step), ``resume`` (a
checkpoint path), ``accumulate``, ``bucket_cap_mb``, ``max_steps``. Lightning's ``strategy="ddp"``
launches the other ranks by re-running this script, so the Trainer is built under ``__main__``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for ddp_helpers

import ddp_helpers as h  # noqa: E402

from lightning_optkit.distributed import OverlapDDPStrategy  # noqa: E402


def run(config: dict) -> None:
    out = Path(config["out"])
    world = config["world"]
    mode = config["mode"]
    callbacks = h.kit_callbacks() if mode == "kit" else []
    if config.get("kill_at") is not None:
        callbacks.append(h.KillAt(config["kill_at"]))
    strategy = None
    ddp_kwargs = {"bucket_cap_mb": config["bucket_cap_mb"]} if "bucket_cap_mb" in config else {}
    if mode == "overlap":
        strategy = OverlapDDPStrategy(**ddp_kwargs)
    elif world > 1 and ddp_kwargs:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(**ddp_kwargs)
    trainer = h.trainer(out, world, strategy=strategy, callbacks=callbacks,
                        accumulate_grad_batches=config.get("accumulate", 1),
                        max_steps=config.get("max_steps", h.MAX_STEPS))
    model = h.TinyNet(optim=h.SPEC, nan_step=h.NAN_STEP if mode == "kit" else None, width=config.get("width", 16))
    trainer.fit(model, h.loader(trainer.global_rank, world), ckpt_path=config.get("resume"))
    state = h.final_state(trainer, model)
    if mode == "overlap":
        state["bucket_updates"] = trainer.strategy.overlap.bucket_updates
        state["buckets"] = sorted(trainer.strategy.overlap.last_bucket_norms)
    torch.save(state, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    for cfg in json.loads(sys.argv[1]):
        run(cfg)
    # Lightning leaves the process group alive after fit; tear it down before the interpreter exits, or
    # gloo's threads can abort the process at exit ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
