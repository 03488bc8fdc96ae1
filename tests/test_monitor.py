"""OptimizerMonitor end to end: real Trainer fits, real W&B offline / CSV files read back, float64 references."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit.callbacks.clipping import GradientClipping
from lightning_optkit.callbacks.monitor import OptimizerMonitor
from lightning_optkit.errors import SpecError
from lightning_optkit.unwrap import raw_optimizer

REL = 1e-5
LAYER_OF = {"net.0.weight": "net.0", "net.0.bias": "net.0", "net.2.weight": "net.2", "net.2.bias": "net.2",
            "scale": "scale"}


class Net(LightningModule):
    """Two linear layers plus a root-level parameter; SGD with two named groups and a per-step schedule."""

    def __init__(self, n: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.scale = nn.Parameter(torch.randn(2))
        self.data = TensorDataset(torch.randn(n, 4), torch.randn(n, 2))

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x) * self.scale, y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        opt = torch.optim.SGD([
            {"params": self.net[0].parameters(), "name": "body"},
            {"params": [*self.net[2].parameters(), self.scale], "name": "head", "lr": 0.05},
        ], lr=0.1, momentum=0.9, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)


class Recorder(Callback):
    """The test's own view of each optimizer step, in float64: grads, params before/after, hyperparams."""

    def __init__(self, key: str = "global_step") -> None:
        self.key = key
        self.steps: dict[tuple[int, int], dict] = {}  # (step key, optimizer index) -> record
        self._batch = -1
        self._open: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step if self.key == "global_step" else self._batch
        idx = [id(o) for o in trainer.optimizers].index(id(raw_optimizer(optimizer)))
        rec = {
            "grads": {n: p.grad.double().clone() for n, p in pl_module.named_parameters() if p.grad is not None
                      and any(p is q for g in optimizer.param_groups for q in g["params"])},
            "before": {n: p.detach().double().clone() for n, p in pl_module.named_parameters()
                       if any(p is q for g in optimizer.param_groups for q in g["params"])},
            "groups": [dict(lr=g["lr"], momentum=g.get("betas", (g.get("momentum"),))[0],
                            weight_decay=g.get("weight_decay")) for g in optimizer.param_groups],
        }
        self.steps[(step, idx)] = rec
        self._open.append(rec)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for rec in self._open:
            rec["after"] = {n: params[n].detach().double().clone() for n in rec["before"]}
        self._open = []


def norm(tensors) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


def expected(rec: dict, layer_of: dict[str, str] = LAYER_OF) -> dict[str, float]:
    """Reference values for one optimizer step (float64), keyed by total / per layer."""
    out = {"grad": norm(rec["grads"].values()), "param": norm(rec["before"].values()),
           "update": norm(rec["after"][n] - rec["before"][n] for n in rec["before"])}
    for layer in set(layer_of.values()):
        names = [n for n in rec["before"] if layer_of[n] == layer]
        if names:
            out[f"grad/{layer}"] = norm(rec["grads"][n] for n in names if n in rec["grads"])
            out[f"param/{layer}"] = norm(rec["before"][n] for n in names)
            out[f"update/{layer}"] = norm(rec["after"][n] - rec["before"][n] for n in names)
    return out


def read_csv_rows(logger: CSVLogger) -> list[dict[str, float]]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------- W&B e2e
def test_wandb_offline_rows_match_float64_reference(tmp_path, monkeypatch, quiet_trainer_kwargs):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from lightning_optkit.wandb_history import read_history

    monkeypatch.setenv("WANDB_MODE", "offline")  # WandbLogger(offline=True) overwrites it; restored after
    recorder = Recorder()
    clip = GradientClipping(max_norm=0.05)
    monitor = OptimizerMonitor(every_n_steps=2, histograms=True)
    kwargs = {**quiet_trainer_kwargs, "logger": WandbLogger(offline=True, save_dir=str(tmp_path))}
    # clipping listed before the monitor: the monitor must still report pre-clip norms
    # log_every_n_steps=2: GradientClipping logs on Lightning's cadence, here the monitor's
    trainer = Trainer(**kwargs, max_steps=6, log_every_n_steps=2, callbacks=[recorder, clip, monitor])
    trainer.fit(Net())
    wandb.finish()
    assert trainer.callbacks.index(monitor) < trainer.callbacks.index(clip)

    rows = [r for r in read_history(tmp_path) if "grad_norm/total" in r]
    assert [r["trainer/global_step"] for r in rows] == [1, 3, 5]
    clipped_somewhere = False
    for row in rows:
        rec = recorder.steps[(row["trainer/global_step"], 0)]
        ref = expected(rec)
        assert row["lr/body"] == pytest.approx(rec["groups"][0]["lr"], rel=1e-12)
        assert row["lr/head"] == pytest.approx(rec["groups"][1]["lr"], rel=1e-12)
        assert row["momentum/head"] == 0.9 and row["weight_decay/body"] == 1e-3
        assert row["grad_norm/total"] == pytest.approx(ref["grad"], rel=REL)
        coef = min(1.0, 0.05 / (ref["grad"] + 1e-6))
        clipped_somewhere |= coef < 1
        assert row["grad_clip/clip_coef"] == pytest.approx(coef, rel=REL)  # one owner of each key, one row
        assert row["grad_norm/total_clipped"] == pytest.approx(ref["grad"] * coef, rel=REL)
        assert row["param_norm/total"] == pytest.approx(ref["param"], rel=REL)
        assert row["update_norm/total"] == pytest.approx(ref["update"], rel=REL)
        assert row["update_ratio/total"] == pytest.approx(ref["update"] / ref["param"], rel=REL)
        for layer in ("net.0", "net.2", "scale"):
            assert row[f"grad_norm/layer/{layer}"] == pytest.approx(ref[f"grad/{layer}"], rel=REL)
            assert row[f"param_norm/layer/{layer}"] == pytest.approx(ref[f"param/{layer}"], rel=REL)
            assert row[f"update_norm/layer/{layer}"] == pytest.approx(ref[f"update/{layer}"], rel=REL)
        hist = row["grad_norm/layer_histogram"]
        assert hist["_type"] == "histogram" and sum(hist["values"]) == 3  # one count per layer
    assert clipped_somewhere, "max_norm too large: the clipped keys were never exercised"
    # GradientClipping's values are in the same W&B row; the pre-clip norm is the monitor's alone
    history = read_history(tmp_path)
    assert [r["trainer/global_step"] for r in history if "grad_clip/clip_coef" in r] == [1, 3, 5]
    assert not any("grad_clip/total_norm" in r or "grad_norm/clip_coef" in r for r in history)
    assert trainer.callback_metrics["grad_clip/total_norm"].item() == pytest.approx(rows[-1]["grad_norm/total"],
                                                                                      rel=REL)
    # the lr logged is the one the step used: StepLR(gamma=0.8) per step, starting at 0.1
    assert [r["lr/body"] for r in rows] == pytest.approx([0.1 * 0.8**s for s in (1, 3, 5)], rel=1e-12)


# ---------------------------------------------------------------------------------------------- manual
class TwoOptimizers(Net):
    def __init__(self) -> None:
        super().__init__(n=32)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        loss = self.loss(batch)
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        body.step()
        head.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.net.parameters(), lr=1e-2, betas=(0.8, 0.99)),
                torch.optim.Adam([self.scale], lr=1e-3, weight_decay=0.1)]


def test_manual_optimization_two_optimizers(tmp_path, quiet_trainer_kwargs):
    recorder = Recorder(key="batch")
    logger = CSVLogger(str(tmp_path))
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=8,  # 2 steps per batch
                      callbacks=[recorder, OptimizerMonitor(every_n_steps=2)])
    trainer.fit(TwoOptimizers())
    rows = [r for r in read_csv_rows(logger) if "lr/Adam/pg0" in r]
    assert [int(r["step"]) for r in rows] == [1, 3]
    for row in rows:
        batch = int(row["step"])
        assert row["lr/Adam/pg0"] == 1e-2 and row["lr/Adam-1/pg0"] == 1e-3
        assert row["momentum/Adam/pg0"] == 0.8 and row["weight_decay/Adam-1/pg0"] == 0.1
        for idx, name in enumerate(("Adam", "Adam-1")):
            ref = expected(recorder.steps[(batch, idx)])
            assert row[f"grad_norm/{name}/total"] == pytest.approx(ref["grad"], rel=REL)
            assert row[f"update_norm/{name}/total"] == pytest.approx(ref["update"], rel=REL)
            assert row[f"param_norm/{name}/total"] == pytest.approx(ref["param"], rel=REL)
        scale_ref = expected(recorder.steps[(batch, 1)])
        assert row["update_norm/layer/scale"] == pytest.approx(scale_ref["update/scale"], rel=REL)
        assert row["grad_norm/layer/net.2"] == pytest.approx(expected(recorder.steps[(batch, 0)])["grad/net.2"],
                                                             rel=REL)
    assert not any(k.startswith("grad_norm/total") for k in rows[0])  # totals are per optimizer here


# ---------------------------------------------------------------------------------------------- accumulation
class MicroBatches(Callback):
    """Keeps the micro-batches of the current accumulation window to recompute the gradient from scratch."""

    def __init__(self) -> None:
        self.window: list = []
        self.reference: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.window.append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        twin = copy.deepcopy(pl_module).double()
        # Lightning divides every micro-batch loss by accumulate_grad_batches, also in a short last window
        loss = sum(twin.loss([t.double() for t in b]) for b in self.window) / trainer.accumulate_grad_batches
        grads = torch.autograd.grad(loss, list(twin.parameters()))
        self.reference[trainer.global_step] = norm(grads)
        self.window = []


def test_gradient_accumulation_logs_the_accumulated_norm_once_per_step(tmp_path, quiet_trainer_kwargs):
    micro = MicroBatches()
    logger = CSVLogger(str(tmp_path))
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=3, accumulate_grad_batches=3,
                      callbacks=[micro, OptimizerMonitor(every_n_steps=1, norms=("grad",), per_layer=False)])
    trainer.fit(Net())
    rows = [r for r in read_csv_rows(logger) if "grad_norm/total" in r]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]  # once per optimizer step, not per batch
    for row in rows:
        assert row["grad_norm/total"] == pytest.approx(micro.reference[int(row["step"])], rel=REL)
        assert not any(k.startswith(("update_norm", "param_norm", "grad_norm/layer")) for k in row)


class PostClipGrads(Callback):
    """Listed after GradientClipping: the total grad norm the optimizer will actually use, in float64."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms[trainer.global_step] = norm(p.grad.double() for p in pl_module.parameters())


@pytest.mark.parametrize("clip_refreshed", [True, False])
def test_clipped_norm_is_the_post_clip_norm_and_never_stale(tmp_path, quiet_trainer_kwargs, clip_refreshed):
    # GradientClipping(algorithm="value") refreshes last_clip_coef on Lightning's logging steps only
    post = PostClipGrads()
    logger = CSVLogger(str(tmp_path))
    callbacks = [GradientClipping(algorithm="value", max_value=0.02), post, OptimizerMonitor(every_n_steps=2)]
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=4, callbacks=callbacks,
                      log_every_n_steps=2 if clip_refreshed else 50)
    trainer.fit(Net())
    rows = [r for r in read_csv_rows(logger) if "grad_norm/total" in r]
    assert [int(r["step"]) for r in rows] == [1, 3]
    for row in rows:
        if clip_refreshed:
            assert row["grad_norm/total_clipped"] == pytest.approx(post.norms[int(row["step"])], rel=REL)
            assert row["grad_clip/clip_coef"] < 1 and "grad_norm/clip_coef" not in row  # the clipper's key
        else:  # a coefficient from an earlier step is left out rather than misreported
            assert "grad_norm/total_clipped" not in row and "grad_norm/clip_coef" not in row


def test_layer_depth_one_groups_by_top_level_module(tmp_path, quiet_trainer_kwargs):
    recorder = Recorder()
    logger = CSVLogger(str(tmp_path))
    monitor = OptimizerMonitor(every_n_steps=1, layer_depth=1, norms="grad", momentum=False)
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=1, callbacks=[recorder, monitor])
    trainer.fit(Net())
    (row,) = read_csv_rows(logger)
    ref = expected(recorder.steps[(0, 0)], {n: n.split(".")[0] for n in LAYER_OF})
    assert sorted(k for k in row if k.startswith("grad_norm/layer/")) == ["grad_norm/layer/net",
                                                                          "grad_norm/layer/scale"]
    assert row["grad_norm/layer/net"] == pytest.approx(ref["grad/net"], rel=REL)
    assert row["grad_norm/layer/scale"] == pytest.approx(ref["grad/scale"], rel=REL)
    assert not any(k.startswith("momentum/") for k in row) and row["weight_decay/head"] == 1e-3


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"every_n_steps": 0}, "every_n_steps"),
    ({"every_n_steps": 2.5}, "every_n_steps"),
    ({"layer_depth": 0}, "layer_depth"),
    ({"norms": ("grad", "updates")}, "norms"),
    ({"per_layer": "yes"}, "per_layer"),
    ({"histograms": True, "per_layer": False}, "histograms"),
])
def test_bad_arguments_fail_at_construction(kwargs, field):
    with pytest.raises(SpecError) as info:
        OptimizerMonitor(**kwargs)
    assert info.value.field == field and "Fix:" in str(info.value)


def test_unknown_norm_suggests_the_closest_name():
    with pytest.raises(SpecError, match="did you mean 'update'"):
        OptimizerMonitor(norms=("grad", "updates"))


def test_histograms_without_wandb_logger_fail_at_setup(tmp_path, quiet_trainer_kwargs):
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": CSVLogger(str(tmp_path))}, max_steps=1,
                      callbacks=[OptimizerMonitor(histograms=True)])
    with pytest.raises(SpecError, match="needs a WandbLogger.*CSVLogger"):
        trainer.fit(Net())


def test_no_logger_fails_at_setup(quiet_trainer_kwargs):
    trainer = Trainer(**quiet_trainer_kwargs, max_steps=1, callbacks=[OptimizerMonitor()])
    with pytest.raises(SpecError, match="nowhere to log"):
        trainer.fit(Net())


# ---------------------------------------------------------------------------------------------- shared names
class TwoAdams(TwoOptimizers):
    """Two optimizers of one class, the second with a NaN gradient at batch 1."""

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        for opt, bad in ((body, False), (head, batch_idx == 1)):
            opt.zero_grad()
            self.manual_backward(self.loss(batch) * (math.nan if bad else 1.0))
            opt.step()


def test_clipping_guard_and_monitor_name_several_optimizers_alike(tmp_path, quiet_trainer_kwargs):
    from lightning_optkit.callbacks.guard import NonFiniteGuard

    logger = CSVLogger(str(tmp_path))
    callbacks = [GradientClipping(max_norm=0.05), NonFiniteGuard(), OptimizerMonitor(norms="grad", per_layer=False)]
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=6, log_every_n_steps=1,
                      callbacks=callbacks)
    trainer.fit(TwoAdams())
    merged: dict[int, dict[str, float]] = {}  # Lightning's rows and the monitor's, joined by step
    for r in read_csv_rows(logger):
        merged.setdefault(int(r["step"]), {}).update(r)
    rows = [merged[s] for s in sorted(merged)]
    assert len(rows) == 3
    keys = set().union(*rows)
    for label in ("Adam", "Adam-1"):
        assert {f"grad_clip/{label}/clip_coef", f"guard/{label}/skipped_steps",
                f"guard/{label}/consecutive_skips", f"lr/{label}/pg0", f"grad_norm/{label}/total"} <= keys
        assert f"grad_clip/{label}/total_norm" not in keys  # the monitor's grad_norm/<label>/total is that norm
    assert not any("_opt" in k for k in keys)
    for row in rows:  # the same label names the same optimizer: the clip came from the monitor's norm
        for label in ("Adam", "Adam-1"):
            total = row[f"grad_norm/{label}/total"]
            if math.isfinite(total):
                assert row[f"grad_clip/{label}/clip_coef"] == pytest.approx(min(1.0, 0.05 / (total + 1e-6)), rel=REL)
    assert rows[-1]["guard/Adam-1/skipped_steps"] == 1 and rows[-1]["guard/Adam/skipped_steps"] == 0


def test_optimizer_labels_prefer_the_kit_name_and_stay_unique():
    from lightning_optkit.callbacks.naming import optimizer_labels

    params = [nn.Parameter(torch.randn(2))]
    named = [torch.optim.SGD(params, lr=0.1) for _ in range(2)]
    for opt in named:
        opt.optkit_name = "gen"
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.optimizers = [*named, torch.optim.Adam(params), torch.optim.Adam(params)]
    assert optimizer_labels(trainer) == ["gen", "gen-1", "Adam", "Adam-1"]


# ---------------------------------------------------------------------------------------------- logging steps
class StopsAtBatch(Net):
    def __init__(self, stop_at: int) -> None:
        super().__init__()
        self.stop_at = stop_at

    def training_step(self, batch, batch_idx):
        if batch_idx == self.stop_at:
            self.trainer.should_stop = True  # as EarlyStopping or Timer would
        return self.loss(batch)


def test_all_callbacks_log_on_the_same_steps_as_lightning(tmp_path, quiet_trainer_kwargs):
    from lightning_optkit.callbacks.guard import NonFiniteGuard

    logger = CSVLogger(str(tmp_path))
    callbacks = [GradientClipping(max_norm=0.05), NonFiniteGuard(), OptimizerMonitor(per_layer=False)]
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=20, log_every_n_steps=3,
                      callbacks=callbacks)
    trainer.fit(StopsAtBatch(stop_at=4))  # Lightning writes rows at steps 2 and 4 (the stop)
    rows = read_csv_rows(logger)
    by_key = {key: [int(r["step"]) for r in rows if key in r]
              for key in ("grad_clip/clip_coef", "guard/skipped_steps", "grad_norm/total", "lr/body")}
    assert by_key == {key: [2, 4] for key in by_key}, by_key


# ---------------------------------------------------------------------------------------------- n-critic
class NCritic(Net):
    """One optimizer stepped three times per batch, on three slices of the batch (manual optimization)."""

    def __init__(self) -> None:
        super().__init__(n=48)
        self.automatic_optimization = False
        self.seen: dict[int, dict] = {}

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        params = dict(self.named_parameters())
        rec = self.seen[batch_idx] = {"before": {n: p.detach().double().clone() for n, p in params.items()},
                                      "grads": []}
        for i in range(3):
            opt.zero_grad()
            self.manual_backward(self.loss([t[i::3] for t in batch]))
            rec["grads"].append({n: p.grad.double().clone() for n, p in params.items()})
            opt.step()
        rec["after"] = {n: p.detach().double().clone() for n, p in params.items()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_several_steps_per_batch_report_the_last_grad_and_the_update_over_the_batch(tmp_path,
                                                                                   quiet_trainer_kwargs):
    logger = CSVLogger(str(tmp_path))
    model = NCritic()
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=6,  # 3 steps per batch
                      callbacks=[OptimizerMonitor(every_n_steps=1)])
    trainer.fit(model)
    rows = [r for r in read_csv_rows(logger) if "grad_norm/total" in r]
    assert [int(r["step"]) for r in rows] == [0, 1]
    for row in rows:
        rec = model.seen[int(row["step"])]
        last, first = norm(rec["grads"][-1].values()), norm(rec["grads"][0].values())
        assert abs(last - first) > 1e-3 * last  # the test tells the first step's norm from the last's
        assert row["grad_norm/total"] == pytest.approx(last, rel=REL)
        assert row["param_norm/total"] == pytest.approx(norm(rec["before"].values()), rel=REL)
        change = norm(rec["after"][n] - rec["before"][n] for n in rec["before"])
        assert row["update_norm/total"] == pytest.approx(change, rel=REL)
        assert row["grad_norm/layer/net.2"] == pytest.approx(
            norm(rec["grads"][-1][n] for n in ("net.2.weight", "net.2.bias")), rel=REL)


def test_clipped_norm_is_the_result_of_every_clipping_callback(tmp_path, quiet_trainer_kwargs):
    """Value clipping then norm clipping: total_clipped is the norm the optimizer finally gets."""

    class FinalNorm(Callback):
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norms.append(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters()]).item())

    final = FinalNorm()
    logger = CSVLogger(str(tmp_path))
    callbacks = [OptimizerMonitor(norms="grad", per_layer=False), GradientClipping(algorithm="value", max_value=0.02),
                 GradientClipping(max_norm=0.05), final]
    trainer = Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=4, log_every_n_steps=1,
                      callbacks=callbacks)
    trainer.fit(Net())
    rows = [r for r in read_csv_rows(logger) if "grad_norm/total_clipped" in r]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    for row, norm in zip(rows, final.norms, strict=True):
        assert row["grad_norm/total_clipped"] == pytest.approx(norm, rel=REL)
        assert row["grad_norm/clip_coef"] == pytest.approx(norm / row["grad_norm/total"], rel=REL)
    assert any(n == pytest.approx(0.05, rel=1e-5) for n in final.norms), final.norms  # the norm clip acted


# ---------------------------------------------------------------------------------------------- per-layer keys
class Encoder(LightningModule):
    """An embedding, a two-layer nn.TransformerEncoder and a head: the layers a user has are the encoder's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)
        self.data = TensorDataset(torch.randn(16, 3, 4), torch.randn(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(self.encoder(self.embed(x)).mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)


def grad_layer_row(tmp_path, quiet_trainer_kwargs, model) -> tuple[dict[str, float], dict]:
    recorder = Recorder()
    logger = CSVLogger(str(tmp_path))
    monitor = OptimizerMonitor(every_n_steps=1, norms="grad", momentum=False)
    Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_steps=1, callbacks=[recorder, monitor]).fit(model)
    (row,) = read_csv_rows(logger)
    return {k.removeprefix("grad_norm/layer/"): v for k, v in row.items() if k.startswith("grad_norm/layer/")}, \
        recorder.steps[(0, 0)]


def test_per_layer_keys_follow_the_numbered_layers_of_a_transformer_encoder(tmp_path, quiet_trainer_kwargs):
    layers, rec = grad_layer_row(tmp_path, quiet_trainer_kwargs, Encoder())
    layer_of = {n: ".".join(n.split(".")[:3]) if n.startswith("encoder.layers.") else n.split(".")[0]
                for n in rec["before"]}  # by hand: encoder.layers.<i>, embed, head
    assert sorted(layers) == ["embed", "encoder.layers.0", "encoder.layers.1", "head"]
    ref = expected(rec, layer_of)
    for layer, value in layers.items():
        assert value == pytest.approx(ref[f"grad/{layer}"], rel=REL), layer


def test_per_layer_keys_follow_the_blocks_of_the_specs_layer_decay(tmp_path, quiet_trainer_kwargs):
    from lightning_optkit import OptimizerMixin, OptimizerSpec

    class Stage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = torch.tanh(block(x))
            return x

    class Staged(OptimizerMixin, LightningModule):
        def __init__(self, layer_decay: dict | None) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), Stage())
            self.head = nn.Linear(8, 2)
            self.optim_spec = OptimizerSpec("sgd", lr=0.1, layer_decay=layer_decay)
            self.data = TensorDataset(torch.randn(16, 4), torch.randn(16, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.head(self.body(x)), y)

        def train_dataloader(self):
            return DataLoader(self.data, batch_size=8)

    decay = {"rate": 0.5, "depth": r"re:blocks\.(\d+)\."}
    layers, rec = grad_layer_row(tmp_path / "decay", quiet_trainer_kwargs, Staged(decay))
    assert sorted(layers) == ["body.0", "body.1.blocks.0", "body.1.blocks.1", "body.1.blocks.2", "head"]
    layer_of = {n: n.rsplit(".", 1)[0] for n in rec["before"]}  # each Linear is its own layer here
    ref = expected(rec, layer_of)
    for layer, value in layers.items():
        assert value == pytest.approx(ref[f"grad/{layer}"], rel=REL), layer
    plain, _ = grad_layer_row(tmp_path / "plain", quiet_trainer_kwargs, Staged(None))
    assert sorted(plain) == ["body.0", "body.1", "head"]  # without layer decay: the first numbered module
