"""The step view: one object per (Trainer, optimizer, step), shared by every gradient stage of that step."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from fit_helpers import MLPRegressor, regression_loader

from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard
from lightning_optkit.callbacks.step_norms import step_view
from lightning_optkit.norms import combine_norms
from lightning_optkit.optim.momentum_sgd import MomentumSGD


class ViewProbe(pl.Callback):
    """Takes the step view in ``on_before_optimizer_step``, where it stands in ``trainer.callbacks``."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        view = step_view(trainer, optimizer)
        self.seen.append((trainer.global_step, view, view.deferred, view.skip))


def test_every_stage_of_a_step_shares_one_view_with_what_each_decided(quiet_trainer_kwargs) -> None:
    first, last = ViewProbe(), ViewProbe()
    clip, guard = GradientClipping(max_norm=0.05), NonFiniteGuard()
    totals: list[torch.Tensor] = []
    coefs: list[torch.Tensor] = []

    class Recorder(pl.Callback):  # right after the clipper: the norm it clipped on and its coefficient
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            totals.append(clip.last_total_norm)
            coefs.append(clip.last_clip_coef)

    model = MLPRegressor(lambda ps: MomentumSGD(ps, lr=0.05), bad_batches=[3])
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_epochs=1,
                         callbacks=[first, clip, Recorder(), guard, last])
    trainer.fit(model, regression_loader())

    assert len(first.seen) == len(last.seen) == 6
    views = [view for _, view, _, _ in last.seen]
    assert len({id(v) for v in views}) == 6  # a new view at every step (the old one may be freed: held here)
    for (step, before, _, _), (step_after, view, deferred, skip), total, coef in zip(
            first.seen, last.seen, totals, coefs, strict=True):
        assert step == step_after and before is view  # built by the first caller, handed to every later one
        assert view.raw is trainer.optimizers[0] and view.index == 0 and view.scope == ""
        assert view.accepts_modifiers and not view.logging  # 6 batches, log_every_n_steps=50
        assert [id(p) for p in view.params] == [id(p) for p in model.parameters()]
        # the norms computed once: the clipper's total is the view's pre-step norms, combined
        assert 2.0 in view.pre
        torch.testing.assert_close(combine_norms(view.pre[2.0], 2.0, total.device), total, rtol=0, atol=0,
                                   equal_nan=True)
        # what the stages decided is on the view: the clipper's deferred coefficient, the guard's flag
        assert deferred is coef  # handed to the optimizer's step, not applied to the gradients
        _, current = view.current_norms(2.0)
        torch.testing.assert_close(combine_norms(current, 2.0, total.device), total * coef, equal_nan=True)
        assert skip is not None and bool(skip) == (step == 3)
    assert guard.last_skip is last.seen[-1][3]
