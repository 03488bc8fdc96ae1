"""Hostile input: every bad spec is a SpecError naming the key before the first batch (issue 17's examples).

The mechanisms: numbers beyond the float range, argument types and arities from the optimizer's or
scheduler's signature, a build-time dry run stepping the optimizer and torch scheduler on probe
parameters, schedule shapes at their edge lengths, a plateau monitor that is never logged, YAML keys
given twice.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optkit import ChainSpec, OptimizerMixin, OptimizerSpec, SpecError, build_optimizers
from lightning_optkit.schedules import Schedule
from lightning_optkit.spec import load_yaml, spec_from_data

HUGE = 10**400


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


HEAD = {"params": "head.*", "name": "head"}
CHAIN = [{"optimizer": "sgd", "lr": 0.1, "params": "head.*"}, {"optimizer": "adam", "lr": 1e-3}]

# (description, spec data, the SpecError's field, a substring of its message)
SPEC_TIME = [
    ("huge lr", {"optimizer": "adam", "lr": HUGE}, "lr", "too large"),
    ("huge weight decay", {"optimizer": "adamw", "lr": 1e-3, "weight_decay": HUGE}, "weight_decay", "too large"),
    ("huge warmup", {"optimizer": "adam", "lr": 1e-3, "schedule": {"name": "cosine", "warmup": HUGE}},
     "schedule.warmup", "too large"),
    ("huge warmup in steps", {"optimizer": "adam", "lr": 1e-3,
                              "schedule": {"name": "cosine", "warmup": f"{HUGE}steps"}}, "schedule.warmup", "large"),
    ("huge optimizer argument", {"optimizer": "adam", "lr": 1e-3, "eps": HUGE}, "eps", "too large"),
    ("one beta", {"optimizer": "adam", "lr": 1e-3, "betas": [0.9]}, "betas", "has 1 value, not 2"),
    ("three betas", {"optimizer": "adam", "lr": 1e-3, "betas": [0.9, 0.99, 0.9]}, "betas", "has 3 values, not 2"),
    ("two betas for Adan", {"optimizer": "adan", "lr": 1e-3, "betas": [0.9, 0.99]}, "betas", "not 3"),
    ("a beta that is text", {"optimizer": "adam", "lr": 1e-3, "betas": [0.9, "high"]}, "betas[1]", "number"),
    ("scalar betas", {"optimizer": "adam", "lr": 1e-3, "betas": 0.9}, "betas", "list of 2"),
    ("list eps", {"optimizer": "adam", "lr": 1e-3, "eps": [1e-8]}, "eps", "is not a number"),
    ("list momentum", {"optimizer": "sgd", "lr": 1e-3, "momentum": [0.9]}, "momentum", "is not a number"),
    ("integer flag", {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": 1}, "nesterov", "true or false"),
    ("text flag", {"optimizer": "adam", "lr": 1e-3, "foreach": "yes"}, "foreach", "true or false or None"),
    ("group option of a wrong type", {"optimizer": "sgd", "lr": 1e-3, "groups": [{**HEAD, "momentum": "x"}]},
     "groups[head].momentum", "is not a number"),
    ("group option out of range", {"optimizer": "sgd", "lr": 1e-3, "groups": [{**HEAD, "momentum": -1}]},
     "groups[head].momentum", "Invalid momentum"),
    ("group option misspelt", {"optimizer": "sgd", "lr": 1e-3, "groups": [{**HEAD, "momentun": 0.9}]},
     "groups[head].momentun", "'momentum'"),
    ("group without params", {"optimizer": "sgd", "lr": 1e-3, "groups": [{"name": "head", "lr": 0.1}]},
     "groups[head].params", "missing"),
    ("no_decay an integer", {"optimizer": "adamw", "lr": 1e-3, "no_decay": 3}, "no_decay", "not a no-decay rule"),
    ("no_decay true", {"optimizer": "adamw", "lr": 1e-3, "no_decay": True}, "no_decay", "not a no-decay rule"),
    ("chain with an unknown key", {"chain": CHAIN, "shedule": {"name": "cosine"}}, "shedule", "'schedule'"),
    ("chain member with bad betas", {"chain": [CHAIN[0], {**CHAIN[1], "betas": [0.9]}]}, "chain[1].betas", "not 2"),
    ("misspelt optimizer key", {"optimizers": "adam", "lr": 1e-3}, "optimizer", "'optimizers'"),
    ("key that is not text", {"optimizer": "adam", "lr": 1e-3, 1: 2}, "1", "not a string"),
    ("scheduler argument of a wrong type", {"optimizer": "sgd", "lr": 0.1,
                                            "schedule": {"class": "LambdaLR", "lr_lambda": "lambda e: 0.9"}},
     "schedule.lr_lambda", "callable"),
    ("scheduler option misspelt", {"optimizer": "sgd", "lr": 0.1,
                                   "schedule": {"class": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1,
                                                "mode": "triangle"}}, "schedule.mode", "'triangular'"),
    ("scheduler strict not a bool", {"optimizer": "sgd", "lr": 0.1, "schedule": {
        "class": "ReduceLROnPlateau", "monitor": "val_loss", "strict": "yes"}}, "schedule.strict", "bool"),
    ("schedule total zero", {"optimizer": "sgd", "lr": 0.1, "schedule": {"name": "cosine", "total": 0}},
     "schedule.total", "zero"),
    ("step schedule without a step size", {"optimizer": "sgd", "lr": 0.1,
                                           "schedule": {"name": "step", "step_size": None}},
     "schedule.step_size", "not a duration"),
]


@pytest.mark.parametrize("data, field, needle", [c[1:] for c in SPEC_TIME], ids=[c[0] for c in SPEC_TIME])
def test_bad_spec_is_a_spec_error_naming_the_key(data, field, needle) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_data(data)
    assert info.value.field == field
    assert needle in str(info.value) and "Fix:" in str(info.value)


def test_yaml_big_integers_are_spec_errors() -> None:
    with pytest.raises(SpecError) as info:
        OptimizerSpec.from_yaml(f"optimizer: adam\nlr: 0.001\neps: {HUGE}\n")
    assert info.value.field == "eps" and "characters" in str(info.value)  # the 401 digits are shortened


# (description, spec data, field, needle): valid alone, wrong for the model or only at a step
BUILD_TIME = [
    ("capturable on CPU parameters", {"optimizer": "adam", "lr": 1e-3, "capturable": True}, "capturable",
     "cpu parameters"),
    ("SparseAdam on dense gradients", {"optimizer": "sparseadam", "lr": 1e-3}, "optimizer", "dense gradients"),
    ("LBFGS with several param groups", {"optimizer": "lbfgs", "lr": 1, "groups": [HEAD]}, "groups",
     "per-parameter options"),
    ("LBFGS with no history", {"optimizer": "lbfgs", "lr": 1, "history_size": 0}, "history_size", "IndexError"),
    ("a group lr that overflows float32", {"optimizer": "sgd", "lr": 0.01, "groups": [{**HEAD, "lr_scale": 1e308}]},
     "groups[head].lr_scale", "overflow"),
    ("StepLR with step size 0", {"optimizer": "sgd", "lr": 0.1, "schedule": {"class": "StepLR", "step_size": 0}},
     "schedule.step_size", "ZeroDivisionError"),
    ("torch scheduler resuming from nowhere", {"optimizer": "sgd", "lr": 0.1,
                                               "schedule": {"class": "StepLR", "step_size": 2, "last_epoch": 5}},
     "schedule.last_epoch", "initial_lr"),
    ("per-group list of the wrong length", {"optimizer": "sgd", "lr": 0.1, "schedule": {
        "class": "OneCycleLR", "max_lr": [0.1, 0.2, 0.3], "total_steps": 10, "interval": "step"}},
     "schedule.max_lr", "max_lr"),
    ("a schedule that overflows", {"optimizer": "sgd", "lr": 0.1,
                                   "schedule": {"name": "exponential", "gamma": 1e308}}, "schedule.gamma",
     "OverflowError"),
    ("chain member that fails at its step", {"chain": [CHAIN[0], {**CHAIN[1], "capturable": True}]},
     "chain[1].capturable", "cpu parameters"),
]


@pytest.mark.parametrize("data, field, needle", [c[1:] for c in BUILD_TIME], ids=[c[0] for c in BUILD_TIME])
def test_spec_failing_only_on_the_model_or_at_a_step_fails_at_build(data, field, needle) -> None:
    spec = spec_from_data(data)  # valid on its own
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(SpecError) as info:
        build_optimizers(net, spec)
    assert info.value.field == field
    assert needle in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the probe never touches the model


def test_numbers_as_text_in_a_torch_scheduler_are_read_as_numbers() -> None:
    spec = spec_from_data({"optimizer": "sgd", "lr": 0.1, "schedule": {"class": "StepLR", "step_size": "3"}})
    config = build_optimizers(Net(), spec)["lr_scheduler"]
    assert config["scheduler"].step_size == 3 and isinstance(config["scheduler"].step_size, int)


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 3, sparse=True)


def test_sparseadam_on_sparse_embeddings_passes_the_probe(gen) -> None:
    model = Embedder()
    optimizer = build_optimizers(model, OptimizerSpec("sparseadam", lr=0.1, no_decay=None))
    model.emb(torch.randint(0, 10, (4,), generator=gen)).sum().backward()
    before = model.emb.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.emb.weight)


class Tiny(OptimizerMixin, L.LightningModule):
    def __init__(self, optim, logged: str | None = "train_loss") -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)
        self.optim_spec = optim
        self.logged = logged

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        if self.logged:
            self.log(self.logged, loss)
        return loss


class FirstBatch(L.Callback):
    started = False

    def on_train_batch_start(self, *args) -> None:
        self.started = True


def _fit(module: L.LightningModule, tmp_path, **trainer_kwargs) -> L.Trainer:
    loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=2)
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path, max_epochs=1)
    trainer = L.Trainer(**{**kwargs, **trainer_kwargs})
    trainer.fit(module, loader)
    return trainer


def test_step_time_failure_stops_a_real_fit_before_the_first_batch(tmp_path) -> None:
    first = FirstBatch()
    with pytest.raises(SpecError) as info:
        _fit(Tiny(OptimizerSpec("adamw", lr=1e-3, capturable=True)), tmp_path, callbacks=[first])
    assert info.value.field == "capturable" and not first.started


# ---- schedules at their edge lengths -----------------------------------------------------------------
BUILT_IN = {
    "constant": {}, "linear": {}, "cosine": {}, "cosine_restarts": {"period": 1}, "polynomial": {},
    "inverse_sqrt": {}, "exponential": {"gamma": 0.5}, "step": {"step_size": 1}, "multistep": {"milestones": [1]},
    "inverse_time": {"lr_decay": 0.1}, "wsd": {}, "onecycle": {"pct_start": 0.3},
    "onecycle_three_phase": {"pct_start": 0.3, "three_phase": True}, "plateau": {"monitor": "val_loss"},
}


EDGES = [(name, warmup, total) for name in sorted(BUILT_IN) for total in (1, 2, 3, 10)
         for warmup in ((0,) if name.startswith("onecycle") else (0, 1, "total"))]  # onecycle: its own rise


@pytest.mark.parametrize("name, warmup, total", EDGES)
def test_every_shape_at_edge_lengths_gives_finite_multipliers_or_a_spec_error(name, warmup, total) -> None:
    kwargs = dict(BUILT_IN[name])
    shape = name.replace("_three_phase", "")
    if warmup:
        kwargs["warmup"] = total if warmup == "total" else warmup
    try:
        values = Schedule(shape, **kwargs).multipliers(total)
    except SpecError as err:
        # the one refusal at these lengths: a warmup as long as the fit
        assert kwargs.get("warmup") == total and err.field == "schedule.warmup", err
        return
    assert len(values) == total
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values), values


@pytest.mark.parametrize("pct_start, total", [(0.1, 10), (0.25, 4), (0.5, 2), (0.2, 5)])
@pytest.mark.parametrize("three_phase", [False, True])
def test_onecycle_with_a_one_step_rise_starts_at_the_peak(pct_start, total, three_phase) -> None:
    # pct_start * total == 1: torch's OneCycleLR divides by zero here
    values = Schedule("onecycle", pct_start=pct_start, three_phase=three_phase).multipliers(total)
    assert values[0] == 1.0
    assert values == sorted(values, reverse=True) if not three_phase or total <= 2 else values[1] < values[0]
    assert values[-1] == pytest.approx(1 / (25.0 * 1e4)) or total == 1


def test_onecycle_matches_torch_where_torch_is_defined() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    torch_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10, pct_start=0.2,
                                                         cycle_momentum=False)
    expected = []
    for _ in range(10):
        expected.append(optimizer.param_groups[0]["lr"] / 0.1)
        optimizer.step()
        torch_schedule.step()
    assert Schedule("onecycle", pct_start=0.2).multipliers(10) == pytest.approx(expected, rel=1e-12)


# ---- plateau monitor never logged ---------------------------------------------------------------------
def test_plateau_strict_on_a_metric_never_logged_fails_at_the_first_epoch_end(tmp_path) -> None:
    spec = OptimizerSpec("sgd", lr=0.1, schedule={"name": "plateau", "monitor": "val_loss", "patience": 0})
    with pytest.raises(SpecError) as info:
        _fit(Tiny(spec), tmp_path, max_epochs=1)
    assert info.value.field == "schedule.monitor"
    assert "val_loss" in str(info.value) and "train_loss" in str(info.value)  # names what is available


def test_plateau_non_strict_on_a_metric_never_logged_warns_once(tmp_path) -> None:
    spec = OptimizerSpec("sgd", lr=0.1, schedule={"name": "plateau", "monitor": "val_loss", "strict": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(Tiny(spec), tmp_path, max_epochs=3)
    about = [w for w in caught if "val_loss" in str(w.message) and "not logged" in str(w.message)]
    assert len(about) == 1 and issubclass(about[0].category, RuntimeWarning)
    assert trainer.current_epoch == 3


def test_plateau_on_a_logged_metric_and_a_fit_cut_short_raise_nothing(tmp_path) -> None:
    logged = OptimizerSpec("sgd", lr=0.1, schedule={"name": "plateau", "monitor": "train_loss"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(Tiny(logged), tmp_path, max_epochs=2)
    assert not [w for w in caught if "not logged" in str(w.message)]
    missing = OptimizerSpec("sgd", lr=0.1, schedule={"name": "plateau", "monitor": "val_loss"})
    trainer = _fit(Tiny(missing), tmp_path, max_steps=2)  # the epoch never completes: Lightning checks nothing
    assert trainer.global_step == 2


class TwoOptimizers(OptimizerMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)
        plateau = {"class": "ReduceLROnPlateau", "monitor": "val_loss", "strict": False}
        self.optim_spec = [OptimizerSpec("sgd", lr=0.1, params="a.*", name="a", schedule=plateau),
                           OptimizerSpec("sgd", lr=0.1, params="b.*", name="b")]

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_step(F.mse_loss(self.a(x), y), optimizer="a")
        self.manual_step(F.mse_loss(self.b(x), y), optimizer="b")


def test_manual_optimization_plateau_non_strict_warns_once(tmp_path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(TwoOptimizers(), tmp_path, max_epochs=4)
    assert len([w for w in caught if "'val_loss', which is not logged" in str(w.message)]) == 1


# ---- YAML ---------------------------------------------------------------------------------------------
def test_yaml_key_given_twice_is_refused_naming_the_key_and_both_lines() -> None:
    text = "optimizer: adamw\nlr: 1e-3\nweight_decay: 0.05\nschedule: {name: cosine, warmup: 5%}\nlr: 3e-4\n"
    with pytest.raises(SpecError) as info:
        OptimizerSpec.from_yaml(text)
    assert info.value.value == "lr" and "lines 2 and 5" in str(info.value)
    with pytest.raises(SpecError, match="'warmup' is a key given twice.*lines 3 and 3"):
        load_yaml("optimizer: sgd\nlr: 0.1\nschedule: {name: cosine, warmup: 1, warmup: 2}\n")


def test_yaml_merge_keys_may_still_be_overridden() -> None:
    data = load_yaml("base: &b {optimizer: adamw, lr: 1e-3}\nspec:\n  <<: *b\n  lr: 2e-3\n")
    assert data["spec"] == {"optimizer": "adamw", "lr": "2e-3"}


def test_chain_spec_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(SpecError, match="did you mean 'name'"):
        ChainSpec.from_dict({"chain": CHAIN, "nam": "hybrid"})
