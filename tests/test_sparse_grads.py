"""Sparse gradients (sparseadam on nn.Embedding(sparse=True)) through the kit's gradient callbacks, in real fits:
norms and clipping of the coalesced values against float64 dense references; AGC refused at setup."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit import OptimizerMixin, SpecError
from lightning_optkit.callbacks import GradientClipping, NonFiniteGuard, OptimizerMonitor
from lightning_optkit.norms import tensor_norms, total_norm

# sparseadam takes the sparse embedding; adamw the dense head (a chain, so one optimizer sees both layouts)
SPEC = {"chain": [{"optimizer": "sparseadam", "lr": 1e-2, "params": "embed.*"},
                  {"optimizer": "adamw", "lr": 1e-2}]}


class SparseBag(OptimizerMixin, L.LightningModule):
    """A sparse embedding (rows looked up several times per batch) and a dense head."""

    def __init__(self, optim: dict = SPEC, nan_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(30, 8, sparse=True)
        self.head = nn.Linear(8, 3)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        tokens, target = batch
        return nn.functional.cross_entropy(self.head(self.embed(tokens).mean(1)), target) * 40.0

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.nan_at:
            grad = self.embed.weight.grad.coalesce()
            grad.values()[0, 0] = math.nan
            self.embed.weight.grad = grad


class Grads(Callback):
    """Each step's gradients as dense float64 tensors (sparse ones summed over repeated rows), per parameter."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).double().clone()
                           for n, p in pl_module.named_parameters()})


def _fit(tmp_path, quiet_trainer_kwargs, clipping: GradientClipping, model: SparseBag | None = None,
         steps: int = 3) -> tuple[Grads, Grads, list[dict], SparseBag]:
    torch.manual_seed(1)
    tokens = torch.randint(0, 6, (4 * steps, 12))  # 6 of 30 rows, each looked up about twice per sample
    data = DataLoader(TensorDataset(tokens, torch.randint(0, 3, (4 * steps,))), batch_size=4)
    pre, post = Grads(), Grads()
    model = model or SparseBag()
    logger = CSVLogger(str(tmp_path), name="sparse")
    trainer = L.Trainer(**{**quiet_trainer_kwargs, "logger": logger}, max_epochs=1, log_every_n_steps=1,
                        callbacks=[pre, OptimizerMonitor(), clipping, NonFiniteGuard(), post])
    trainer.fit(model, data)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return pre, post, [r for r in rows if "guard/skipped_steps" in r], model


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))


def test_norm_clipping_monitor_and_guard_on_sparse_gradients(tmp_path, quiet_trainer_kwargs):
    pre, post, rows, _ = _fit(tmp_path, quiet_trainer_kwargs, GradientClipping(max_norm=0.05))
    assert len(rows) == len(pre.steps) == 3
    for row, before, after in zip(rows, pre.steps, post.steps):
        total = _norm(before)
        coef = min(1.0, 0.05 / (total + 1e-6))
        assert coef < 1.0  # the limit bites, so the check below can fail
        assert row["grad_norm/total"] == pytest.approx(total, rel=1e-5)
        assert row["grad_clip/clip_coef"] == pytest.approx(coef, rel=1e-5)
        assert row["grad_norm/layer/embed"] == pytest.approx(before["embed.weight"].norm().item(), rel=1e-5)
        for name in before:
            torch.testing.assert_close(after[name], before[name] * coef, rtol=1e-5, atol=1e-8)
        assert row["guard/skipped_steps"] == 0.0


def test_value_clipping_clamps_rows_after_summing_repeated_lookups(tmp_path, quiet_trainer_kwargs):
    pre, post, rows, _ = _fit(tmp_path, quiet_trainer_kwargs, GradientClipping(algorithm="value", max_value=0.02))
    for before, after in zip(pre.steps, post.steps):
        assert before["embed.weight"].abs().max() > 0.02  # the limit bites
        for name in before:  # float32 sums in another order than the dense reference's: 1e-5
            torch.testing.assert_close(after[name], before[name].clamp(-0.02, 0.02), rtol=1e-5, atol=1e-7)


def test_guard_skips_a_non_finite_sparse_gradient(tmp_path, quiet_trainer_kwargs):
    model = SparseBag(nan_at=1)
    weights = []

    class Weights(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights.append(pl_module.embed.weight.detach().clone())

    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randint(0, 6, (12, 12)), torch.randint(0, 3, (12,))), batch_size=4)
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=1, callbacks=[GradientClipping(1.0), NonFiniteGuard(),
                                                                          Weights()])
    trainer.fit(model, data)
    assert torch.equal(weights[0], weights[1])  # the NaN step left the embedding alone
    assert not torch.equal(weights[1], weights[2])
    assert torch.isfinite(model.embed.weight).all()


def test_agc_refuses_a_sparse_embedding_at_setup_and_accepts_it_excluded(tmp_path, quiet_trainer_kwargs):
    data = DataLoader(TensorDataset(torch.randint(0, 6, (8, 12)), torch.randint(0, 3, (8,))), batch_size=4)
    model = SparseBag()
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=1, callbacks=[GradientClipping(algorithm="agc")])
    with pytest.raises(SpecError, match="parameter 'embed.weight'.*sparse gradients") as err:
        trainer.fit(model, data)
    assert "exclude=['embed.weight']" in err.value.fix
    assert model.embed.weight.grad is None  # refused before the first batch
    trainer = L.Trainer(**quiet_trainer_kwargs, max_epochs=1,
                        callbacks=[GradientClipping(algorithm="agc", exclude=["embed"])])
    trainer.fit(model, data)
    assert trainer.global_step == 2


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_sparse_norms_match_dense_float64(gen, norm_type):
    index = torch.randint(0, 7, (2, 40), generator=gen)  # uncoalesced: repeated indices sum
    values = torch.randn(40, generator=gen, dtype=torch.float64)
    sparse = torch.sparse_coo_tensor(index, values, (7, 7), check_invariants=True)
    dense = torch.randn(5, generator=gen, dtype=torch.float64)
    empty = torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (3, 3), check_invariants=True)
    norms = tensor_norms([sparse, dense, empty], norm_type)
    expected = torch.linalg.vector_norm(sparse.to_dense(), norm_type)
    torch.testing.assert_close(norms[0], expected, rtol=1e-12, atol=0)
    assert norms[2].item() == 0.0
    whole = torch.cat([sparse.to_dense().flatten(), dense])
    torch.testing.assert_close(total_norm([sparse, dense], norm_type), torch.linalg.vector_norm(whole, norm_type),
                               rtol=1e-12, atol=0)
