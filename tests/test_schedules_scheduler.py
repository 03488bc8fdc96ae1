"""KitLRScheduler mechanics: state_dict, pickle, added groups, skipped steps, plateau vs torch."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as tls

from lightning_optkit.schedules import KitLRScheduler, Schedule

BASES = (0.1, 0.02)


def two_group_adamw() -> torch.optim.AdamW:
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    return torch.optim.AdamW([{"params": [a], "lr": BASES[0]}, {"params": [b], "lr": BASES[1]}])


def train_steps(opt: torch.optim.Optimizer, sched: KitLRScheduler, n: int) -> list[list[float]]:
    out = []
    for _ in range(n):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p)
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


SCHEDULE = Schedule("cosine", warmup=4, warmup_start_factor=0.1, min_lr_ratio=0.05)


def test_state_dict_round_trip_resumes_the_same_sequence() -> None:
    opt = two_group_adamw()
    sched = SCHEDULE.build(opt, total_steps=20)
    reference = train_steps(opt, sched, 20)

    opt1 = two_group_adamw()
    sched1 = SCHEDULE.build(opt1, total_steps=20)
    first = train_steps(opt1, sched1, 7)
    saved = pickle.loads(pickle.dumps((opt1.state_dict(), sched1.state_dict())))  # plain data
    assert set(saved[1]) == {"last_epoch", "_step_count", "base_lrs", "plateau"}

    opt2 = two_group_adamw()
    sched2 = SCHEDULE.build(opt2, total_steps=20)  # the order Lightning uses: build, then load
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    rest = train_steps(opt2, sched2, 13)
    assert first + rest == reference


def test_load_state_dict_alone_restores_the_lrs() -> None:
    opt = two_group_adamw()
    sched = SCHEDULE.build(opt, total_steps=20)
    train_steps(opt, sched, 9)
    fresh_opt = two_group_adamw()
    fresh = SCHEDULE.build(fresh_opt, total_steps=20)
    fresh.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    assert fresh.get_last_lr() == sched.get_last_lr()


def test_pickle_round_trip_continues_identically() -> None:
    opt = two_group_adamw()
    sched = Schedule("onecycle").build(opt, total_steps=15)
    train_steps(opt, sched, 5)
    clone = pickle.loads(pickle.dumps(sched))
    assert isinstance(clone, KitLRScheduler) and clone.last_epoch == sched.last_epoch
    a = train_steps(opt, sched, 10)
    b = train_steps(clone.optimizer, clone, 10)
    assert a == b


def test_added_param_group_is_scheduled_from_its_own_lr() -> None:
    opt = two_group_adamw()
    sched = Schedule("linear", min_lr_ratio=0.0).build(opt, total_steps=10)
    train_steps(opt, sched, 4)
    backbone = torch.nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [backbone], "lr": 0.5})  # unfrozen later in fine-tuning
    train_steps(opt, sched, 1)
    assert opt.param_groups[2]["lr"] == pytest.approx(0.5 * (1 - 5 / 10))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 5 / 10))
    train_steps(opt, sched, 3)
    assert opt.param_groups[2]["lr"] == pytest.approx(0.5 * (1 - 8 / 10))
    assert sched.state_dict()["base_lrs"] == [0.1, 0.02, 0.5]


def test_tensor_lr_is_updated_in_place() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    lr = torch.tensor(0.01)
    opt = torch.optim.Adam([p], lr=lr)
    sched = Schedule("linear").build(opt, total_steps=4)
    train_steps(opt, sched, 2)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.01 * 0.5)


def _overflowing_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    loss = sum((p * float("inf")).sum() for p in params)
    scaler.scale(loss).backward()
    scaler.step(opt)  # finds inf grads and skips optimizer.step()
    scaler.update()


def test_skipped_first_step_emits_no_scheduler_order_warning() -> None:
    opt = two_group_adamw()
    sched = SCHEDULE.build(opt, total_steps=20)
    scaler = torch.amp.GradScaler("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _overflowing_step(opt, scaler)
        sched.step()
        sched.step()
    assert [str(w.message) for w in caught] == []
    assert sched.last_epoch == 2  # the schedule counts Lightning's steps, skipped ones included

    # the same sequence with a torch scheduler does warn (so the check above can fail)
    opt_t = two_group_adamw()
    torch_sched = tls.LambdaLR(opt_t, lambda t: 1.0)
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        _overflowing_step(opt_t, torch.amp.GradScaler("cpu"))
        torch_sched.step()


def test_plateau_matches_torch_reduce_on_plateau() -> None:
    metrics = [1.0, 0.9, 0.95, 0.93, 0.92, 0.91, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    opt = two_group_adamw()
    sched = Schedule("plateau", monitor="val_loss", patience=1, factor=0.5, cooldown=1, threshold=0.05,
                     min_lr_ratio=0.1).build(opt, total_steps=None)
    opt_t = two_group_adamw()
    torch_sched = tls.ReduceLROnPlateau(opt_t, patience=1, factor=0.5, cooldown=1, threshold=0.05,
                                        min_lr=[0.1 * b for b in BASES])
    for value in metrics:
        opt.step()
        opt_t.step()
        sched.step(torch.tensor(value))
        torch_sched.step(value)
        ours = [g["lr"] for g in opt.param_groups]
        assert ours == pytest.approx([g["lr"] for g in opt_t.param_groups], abs=1e-12)
    assert ours == pytest.approx([0.1 * b for b in BASES])  # reached the floor


def test_plateau_with_warmup_warms_per_step_and_reduces_per_result() -> None:
    opt = two_group_adamw()
    sched = Schedule("plateau", monitor="val_loss", warmup=4, patience=0, factor=0.5).build(opt, total_steps=None)
    lrs = [[g["lr"] for g in opt.param_groups]]
    for t in range(8):
        opt.step()
        sched.step(1.0 if t in (5, 6) else None)  # two validation results, no improvement on the second
        lrs.append([g["lr"] for g in opt.param_groups])
    factors = [row[0] / BASES[0] for row in lrs]
    assert factors == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.5, 0.5])


def test_non_plateau_step_rejects_a_metric() -> None:
    sched = SCHEDULE.build(two_group_adamw(), total_steps=10)
    with pytest.raises(TypeError, match="not a plateau schedule"):
        sched.step(0.5)
