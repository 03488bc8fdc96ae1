"""The step's gradient norms are computed once per step and kept per Trainer."""

from __future__ import annotations

import gc
import weakref

import lightning.pytorch as pl
import torch

from lightning_optkit.callbacks import step_norms
from lightning_optkit.callbacks.step_norms import current_grad_norms, note_grads_modified, step_grad_norms


def quiet_trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False)


def test_two_trainers_never_share_a_step_entry(gen) -> None:
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    optimizer = torch.optim.SGD(params, lr=0.1)
    want = [p.grad.norm() for p in params]
    outer, inner = quiet_trainer(), quiet_trainer()

    _, norms = step_grad_norms(outer, optimizer, 2.0)
    torch.testing.assert_close(torch.stack(norms), torch.stack(want), rtol=1e-15, atol=0)
    note_grads_modified(outer, optimizer, deferred_scale=torch.tensor(0.5, dtype=torch.float64))
    # another Trainer (a fit inside a callback, a tuner) at the same optimizer and step: its own entry
    _, inner_norms = current_grad_norms(inner, optimizer, 2.0)
    torch.testing.assert_close(torch.stack(inner_norms), torch.stack(want), rtol=1e-15, atol=0)
    _, outer_norms = current_grad_norms(outer, optimizer, 2.0)  # still sees its deferred scale
    torch.testing.assert_close(torch.stack(outer_norms), 0.5 * torch.stack(want), rtol=1e-15, atol=0)

    held, inner_ref = len(step_norms._STEP_NORMS), weakref.ref(inner)
    del inner
    gc.collect()  # (also collects Trainers earlier tests left in reference cycles)
    assert inner_ref() is None  # the cache does not keep a finished Trainer alive, and its entry goes with it
    assert len(step_norms._STEP_NORMS) <= held - 1 and outer in step_norms._STEP_NORMS
