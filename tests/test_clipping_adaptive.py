"""zscore and quantile clipping: thresholds follow past norms and survive a real checkpoint resume."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from fit_helpers import MLPRegressor, regression_loader
from torch.utils.data import DataLoader

from lightning_optkit.callbacks._adaptive import NormHistory, RunningNormStats
from lightning_optkit.callbacks.clipping import GradientClipping

ADAPTIVE = {
    "zscore": dict(algorithm="zscore", z_thresh=0.5, warmup_steps=3, alpha=0.9),
    "quantile": dict(algorithm="quantile", quantile=0.5, history=8, warmup_steps=3),
}


class Regressor(MLPRegressor):
    """SGD with momentum."""

    def __init__(self) -> None:
        super().__init__(lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))


def make_loader() -> DataLoader:  # 6 batches per epoch
    return regression_loader(48, target_scale=3)


class Thresholds(pl.Callback):
    def __init__(self, clip: GradientClipping) -> None:
        self.clip, self.values = clip, []

    def on_train_batch_end(self, *args):
        self.values.append(self.clip.last_threshold.item())


@pytest.mark.parametrize("name", ["zscore", "quantile"])
def test_resume_from_checkpoint_keeps_thresholds(name, quiet_trainer_kwargs, tmp_path):
    loader = make_loader()
    model = Regressor()
    initial = copy.deepcopy(model)

    clip = GradientClipping(**ADAPTIVE[name])
    record = Thresholds(clip)
    pl.Trainer(**quiet_trainer_kwargs, max_epochs=2, callbacks=[clip, record]).fit(model, loader)
    assert all(math.isinf(v) for v in record.values[:3])  # warmup, no max_norm: no clipping
    assert all(math.isfinite(v) for v in record.values[3:])

    first = copy.deepcopy(initial)
    first_clip = GradientClipping(**ADAPTIVE[name])
    trainer = pl.Trainer(**quiet_trainer_kwargs, max_epochs=1, callbacks=[first_clip])
    trainer.fit(first, loader)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = Regressor()  # different init: everything must come from the checkpoint
    resumed_clip = GradientClipping(**ADAPTIVE[name])
    resumed_record = Thresholds(resumed_clip)
    pl.Trainer(**quiet_trainer_kwargs, max_epochs=2, callbacks=[resumed_clip, resumed_record]).fit(
        resumed, loader, ckpt_path=ckpt)

    assert resumed_record.values == pytest.approx(record.values[6:], rel=1e-6)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adaptive_clipping_clips_above_the_threshold(quiet_trainer_kwargs):
    clip = GradientClipping(**ADAPTIVE["zscore"])
    coefs = []

    class Coefs(pl.Callback):
        def on_train_batch_end(self, *args):
            coefs.append((clip.last_total_norm.item(), clip.last_threshold.item(), clip.last_clip_coef.item()))

    pl.Trainer(**quiet_trainer_kwargs, max_steps=12, callbacks=[clip, Coefs()]).fit(Regressor(), make_loader())
    for norm, threshold, coef in coefs:
        assert coef == pytest.approx(min(1.0, threshold / (norm + 1e-6)), rel=1e-6)
    assert any(c < 1.0 for _, _, c in coefs), "the test must actually clip"


def test_running_stats_match_float64_mean_and_ema():
    xs = torch.rand(12, dtype=torch.float64) * 5 + 0.5
    stats = RunningNormStats(alpha=0.9, warmup=5)
    for x in xs[:5]:
        stats.update(x.float())
    torch.testing.assert_close(stats.mean.double(), xs[:5].mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.var.double(), xs[:5].var(unbiased=False), rtol=1e-5, atol=0)
    mean, var = xs[:5].mean(), xs[:5].var(unbiased=False)
    for x in xs[5:]:
        stats.update(x.float())
        d = x - mean
        mean = mean + 0.1 * d
        var = 0.9 * (var + 0.1 * d * d)
    torch.testing.assert_close(stats.mean.double(), mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.var.double(), var, rtol=1e-4, atol=0)
    before = stats.state_dict()
    stats.update(torch.tensor(float("nan")))
    stats.update(torch.tensor(float("inf")))
    assert torch.equal(stats.mean, before["mean"]) and torch.equal(stats.count, before["count"])


def test_norm_history_quantile_and_resize():
    xs = torch.rand(10) * 3
    hist = NormHistory(length=6, quantile=0.25, warmup=2)
    for x in xs:
        hist.update(x)
    hist.update(torch.tensor(float("nan")))  # leaves a hole, not a value
    expected = torch.quantile(xs[-5:], 0.25)
    torch.testing.assert_close(hist.value(torch.device("cpu")), expected)
    smaller = NormHistory(length=3, quantile=0.25, warmup=2)
    smaller.load_state_dict(hist.state_dict())
    torch.testing.assert_close(smaller.value(torch.device("cpu")), torch.quantile(xs[-2:], 0.25))
