"""Kit schedules against their closed forms and against torch's own schedulers (two groups, 1e-7)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as tls

from lightning_optkit.errors import SpecError
from lightning_optkit.schedules import Schedule

BASES = (0.1, 0.02)


def two_group_sgd() -> torch.optim.SGD:
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    return torch.optim.SGD([{"params": [a], "lr": BASES[0]}, {"params": [b], "lr": BASES[1]}], lr=1.0)


def kit_lrs(schedule: Schedule, total: int, steps: int, steps_per_epoch: int | None = None) -> list[list[float]]:
    """Each group's lr used at optimizer steps 0 .. steps-1."""
    opt = two_group_sgd()
    sched = schedule.build(opt, total_steps=total, steps_per_epoch=steps_per_epoch)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def torch_lrs(make, steps: int) -> list[list[float]]:
    opt = two_group_sgd()
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


TORCH_CASES = [
    ("cosine", {}, 20, lambda o: tls.CosineAnnealingLR(o, T_max=20), 21),
    ("linear", {"min_lr_ratio": 0.1}, 16, lambda o: tls.LinearLR(o, 1.0, 0.1, total_iters=16), 20),
    ("constant", {"warmup": 6, "warmup_start_factor": 0.25}, 30, lambda o: tls.LinearLR(o, 0.25, 1.0, 6), 12),
    ("step", {"step_size": 3, "gamma": 0.5}, 30, lambda o: tls.StepLR(o, 3, gamma=0.5), 14),
    ("multistep", {"milestones": [2, 5, 9], "gamma": 0.3}, 30, lambda o: tls.MultiStepLR(o, [2, 5, 9], 0.3), 14),
    ("exponential", {"gamma": 0.87}, 30, lambda o: tls.ExponentialLR(o, 0.87), 14),
    ("polynomial", {"power": 2.0}, 12, lambda o: tls.PolynomialLR(o, total_iters=12, power=2.0), 12),
    ("cosine_restarts", {"period": 4, "period_mult": 2}, 40,
     lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2), 30),
    ("onecycle", {}, 25, lambda o: tls.OneCycleLR(o, list(BASES), total_steps=25, cycle_momentum=False), 25),
    ("onecycle", {"pct_start": 0.25, "anneal_strategy": "linear", "three_phase": True}, 24,
     lambda o: tls.OneCycleLR(o, list(BASES), total_steps=24, pct_start=0.25, anneal_strategy="linear",
                              three_phase=True, cycle_momentum=False), 24),
]


@pytest.mark.parametrize(("name", "kwargs", "total", "make", "steps"), TORCH_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(TORCH_CASES)])
def test_matches_torch_scheduler(name, kwargs, total, make, steps) -> None:
    ours = kit_lrs(Schedule(name, total=total, **kwargs), total, steps)
    theirs = torch_lrs(make, steps)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, abs=1e-7, rel=0), f"step {t}"
    assert ours[3][0] / ours[3][1] == pytest.approx(BASES[0] / BASES[1])  # each group keeps its own base


def warm(t: int, w: int, s: float) -> float:
    return s + (1 - s) * t / w


@pytest.mark.parametrize(
    ("name", "kwargs", "decay"),
    [
        ("cosine", {}, lambda s, d: 0.5 * (1 + math.cos(math.pi * s / d))),
        ("linear", {}, lambda s, d: 1 - s / d),
        ("polynomial", {"power": 0.5}, lambda s, d: (1 - s / d) ** 0.5),
        ("inverse_sqrt", {}, lambda s, d: math.sqrt(5 / (s + 5))),
        ("inverse_sqrt", {"timescale": 20}, lambda s, d: math.sqrt(20 / (s + 20))),
        ("inverse_time", {"lr_decay": 0.3}, lambda s, d: 1 / (1 + 0.3 * s)),
        ("exponential", {"gamma": "0.9"}, lambda s, d: 0.9**s),
        ("wsd", {"decay": "20%"}, lambda s, d: 1.0 if s < 35 - 8 else 1 - (s - 27) / 8),
        ("wsd", {"decay": 10, "decay_shape": "1-sqrt"}, lambda s, d: 1.0 if s < 25 else 1 - math.sqrt((s - 25) / 10)),
        # at the end (s = d = 35, a cycle boundary) the last cycle ends at its bottom, it does not restart
        ("cosine_restarts", {"period": 7},
         lambda s, d: 0.5 * (1 + math.cos(math.pi * (s % 7 if s < d or s % 7 else 7) / 7))),
    ],
)
def test_closed_form_with_warmup_and_floor(name, kwargs, decay) -> None:
    """warmup=5 from 0.2, floor 0.1, total 40: the decay spans steps 5..40 (35 steps)."""
    schedule = Schedule(name, warmup=5, warmup_start_factor=0.2, min_lr_ratio=0.1, total=40, **kwargs)
    lrs = kit_lrs(schedule, 40, 48)
    for t in (0, 1, 4, 5, 6, 12, 21, 33, 39, 40, 47):
        if t < 5:
            expected = warm(t, 5, 0.2)
        else:
            expected = 0.1 + 0.9 * decay(min(t, 40) - 5, 35)
        for group, base in enumerate(BASES):
            assert lrs[t][group] == pytest.approx(base * expected, abs=1e-12), (t, group)


def test_no_warmup_first_step_full_lr_and_hold_after_total() -> None:
    lrs = kit_lrs(Schedule("cosine", min_lr_ratio=0.05), 10, 15)
    assert lrs[0] == pytest.approx(list(BASES), abs=0)
    for t in range(10, 15):  # held at the floor: no cosine bounce, no exception past total
        assert lrs[t] == pytest.approx([0.05 * b for b in BASES], abs=1e-15)
    one = kit_lrs(Schedule("onecycle"), 10, 14)
    assert one[13] == one[9]


def test_multipliers_preview_matches_scheduler() -> None:
    schedule = Schedule("wsd", warmup="10%", decay=0.3, decay_shape="cosine")
    ms = schedule.multipliers(30)
    assert len(ms) == 30
    lrs = kit_lrs(schedule, 30, 30)
    assert [row[1] for row in lrs] == pytest.approx([BASES[1] * m for m in ms], abs=1e-15)
    assert ms[0] == 0.0 and ms[3] == 1.0 and ms[21] == 1.0 and ms[22] < 1.0  # decays over the last 9 of 30


def test_interval_epoch_changes_lr_at_epoch_boundaries_and_ints_count_epochs() -> None:
    ms = Schedule("step", step_size=1, gamma=0.5, interval="epoch").multipliers(12, steps_per_epoch=4)
    assert ms == [1.0] * 4 + [0.5] * 4 + [0.25] * 4  # torch StepLR(step_size=1) stepped per epoch
    ms = Schedule("cosine", warmup=1, interval="epoch").multipliers(12, steps_per_epoch=4)
    assert ms[:4] == [0.0] * 4 and ms[4:8] == [1.0] * 4 and ms[8] == pytest.approx(0.5)
    with pytest.raises(SpecError, match="steps per epoch"):
        Schedule("cosine", interval="epoch").multipliers(12)
    with pytest.raises(SpecError, match="whole number of epochs"):
        Schedule("cosine", warmup="3steps", interval="epoch").multipliers(12, steps_per_epoch=4)


def test_register_schedule_in_a_few_lines() -> None:
    from lightning_optkit.schedules import register_schedule

    @register_schedule("test_cubic", overwrite=True)
    def cubic(step: int, decay_steps: int, *, sharpness: float = 3.0) -> float:
        return (1 - step / decay_steps) ** sharpness

    ms = Schedule("test_cubic", warmup=2, sharpness="2").multipliers(12)
    assert ms[2] == 1.0 and ms[7] == pytest.approx((1 - 5 / 10) ** 2)
    with pytest.raises(SpecError, match="sharpnes") as info:
        Schedule("test_cubic", sharpnes=2)
    assert "did you mean 'sharpness'" in str(info.value)


def test_dict_round_trip_and_yaml_strings() -> None:
    d = {"name": "multistep", "warmup": "2ep", "milestones": ["50%", 300], "gamma": "1e-1", "min_lr_ratio": "1e-3"}
    schedule = Schedule.from_dict(d)
    assert schedule.kwargs["gamma"] == 0.1 and schedule.min_lr_ratio == 0.001
    again = Schedule.from_dict(schedule.to_dict())
    assert again == schedule and again.to_dict() == schedule.to_dict()
    assert Schedule.from_dict({"name": "cosine"}).to_dict() == {"name": "cosine"}


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("cosin",), {}, "schedule.name"),
        (("cosine",), {"gama": 0.1}, "schedule.gama"),
        (("cosine",), {"warmup": -1}, "schedule.warmup"),
        (("cosine",), {"warmup": 10, "total": 10}, "schedule.warmup"),
        (("cosine",), {"warmup": "50%", "total": "20%"}, "schedule.warmup"),
        (("cosine",), {"min_lr_ratio": 1.5}, "schedule.min_lr_ratio"),
        (("cosine",), {"warmup": "5 epochs?"}, "schedule.warmup"),
        (("cosine",), {"total": "abc"}, "schedule.total"),
        (("cosine",), {"interval": "batch"}, "schedule.interval"),
        (("exponential",), {}, "schedule.gamma"),
        (("exponential",), {"gamma": "fast"}, "schedule.gamma"),
        (("multistep",), {"milestones": [5, 3]}, "schedule.milestones"),
        (("onecycle",), {"warmup": 5}, "schedule.warmup"),
        (("wsd",), {"decay_shape": "cubic"}, "schedule.decay_shape"),
        (("plateau",), {"monitor": "val_loss", "factor": 2}, "schedule.factor"),
    ],
)
def test_invalid_specs_name_the_field(args, kwargs, field) -> None:
    with pytest.raises(SpecError) as info:
        Schedule(*args, **kwargs)
    assert info.value.field == field
    assert "Fix:" in str(info.value)


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(SpecError, match="did you mean 'cosine'"):
        Schedule("cosin")


def test_warmup_longer_than_resolved_total_fails_at_resolution() -> None:
    with pytest.raises(SpecError, match="resolves to 50"):
        Schedule("cosine", warmup=50).multipliers(40)


REQUIRED = {"exponential": {"gamma": 0.9}, "step": {"step_size": 3}, "multistep": {"milestones": [20, 30]},
            "inverse_time": {"lr_decay": 0.1}, "plateau": {"monitor": "val_loss"}}


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "cosine_restarts", "polynomial", "inverse_sqrt",
                                  "exponential", "step", "multistep", "inverse_time", "wsd", "plateau"])
def test_every_builtin_warms_up_to_one_stays_in_range_and_holds_after_total(name) -> None:
    schedule = Schedule(name, warmup=10, warmup_start_factor=0.1, min_lr_ratio=0.05, total=40,
                        **REQUIRED.get(name, {}))
    ms = schedule.multipliers(60)
    assert ms[0] == pytest.approx(0.1) and ms[5] == pytest.approx(0.55) and ms[10] == 1.0
    assert all(0.0 <= m <= 1.0 for m in ms)
    assert ms[40:] == [ms[40]] * 20
    if name not in ("constant", "plateau"):
        assert ms[39] < 1.0  # it does decay


def test_register_a_class_and_reject_unreadable_signatures() -> None:
    from lightning_optkit.schedules import register_schedule

    @register_schedule("test_halving", durations=("every",), needs_total=False, overwrite=True)
    class Halving:
        def __init__(self, every: int = 5) -> None:
            self.every = every

        def __call__(self, step: int, decay_steps: int | None) -> float:
            return 0.5 ** (step // self.every)

    assert Schedule("test_halving", every="2steps").multipliers(6) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    with pytest.raises(TypeError, match="name every keyword"):
        register_schedule("test_bad")(lambda step, decay_steps, **kw: 1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("cosine")(lambda step, decay_steps: 1.0)


HOLD_CASES = [(name, {**REQUIRED.get(name, {}), **extra}) for name, extra in [
    ("constant", {}), ("linear", {}), ("cosine", {}), ("cosine_restarts", {}), ("cosine_restarts", {"period": 9}),
    ("cosine_restarts", {"period": 7}), ("cosine_restarts", {"period": 12, "period_mult": 2}), ("polynomial", {}),
    ("inverse_sqrt", {}), ("exponential", {}), ("step", {}), ("multistep", {}), ("inverse_time", {}), ("wsd", {}),
    ("wsd", {"decay_shape": "cosine"}), ("plateau", {}), ("onecycle", {}),
]]


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize(("name", "kwargs"), HOLD_CASES, ids=[f"{n}{sorted(k.items())}" for n, k in HOLD_CASES])
def test_every_schedule_is_constant_after_total_at_the_end_of_its_curve(name, kwargs, interval) -> None:
    """After ``total`` the multiplier holds the value the curve ended on: no restart, no bounce back up."""
    per_epoch = 3 if interval == "epoch" else None
    warmup = {} if name == "onecycle" else {"warmup": 4, "min_lr_ratio": 0.05}
    schedule = Schedule(name, total=40, interval=interval, **warmup, **kwargs)
    end = 40 * (per_epoch or 1)
    ms = schedule.multipliers(3 * end, per_epoch)
    assert ms[end:] == [ms[end]] * (2 * end), "not constant after total"
    last = ms[end - (per_epoch or 1)]  # the curve's last value before total
    assert ms[end] <= last + 1e-12, f"jumps back up at total: {last} -> {ms[end]}"
    assert ms[end] == pytest.approx(schedule.curve(end, per_epoch)(10**9))


def test_cosine_restarts_ends_at_the_floor_when_total_is_a_cycle_boundary() -> None:
    ms = Schedule("cosine_restarts", period=100, total=500).multipliers(1000)
    assert ms[100] == 1.0 and ms[499] < 1e-3  # restarts inside the schedule, as before
    assert ms[500:] == [0.0] * 500  # the final value of the last cycle, like plain cosine
    assert Schedule("cosine", total=500).multipliers(1000)[500:] == [0.0] * 500
    floored = Schedule("cosine_restarts", period=100, period_mult=2, total=700, min_lr_ratio=0.1).multipliers(900)
    assert floored[300] == 1.0 and floored[700:] == [pytest.approx(0.1)] * 200
