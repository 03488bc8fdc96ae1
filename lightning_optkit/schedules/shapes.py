"""Schedule shapes: the decay curve after warmup, by name, and ``register_schedule`` to add one.

A shape is a function ``shape(step, decay_steps, **kwargs) -> float`` giving the decay factor (1.0 at
the start, typically 0.0 at the end) ``step`` optimizer steps after warmup, out of ``decay_steps``
(None when the fit length is unknown and the shape does not need it). The kit adds the linear warmup,
the ``min_lr_ratio`` floor (``floor + (1 - floor) * factor``) and holds the value after ``total``::

    @register_schedule("cubic")
    def cubic(step: int, decay_steps: int, *, sharpness: float = 3.0) -> float:
        return (1 - step / decay_steps) ** sharpness

A class works too: its ``__init__`` keywords are the schedule's keywords and its instances are called
as ``instance(step, decay_steps)``. A keyword-only parameter named ``warmup_steps`` is filled by the
kit with the warmup length (in the schedule's clock unit).
"""

from __future__ import annotations

import inspect
import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from lightning_optkit.errors import SpecError, closest
from lightning_optkit.validation import flag, number

Shape = Callable[..., float]
F = TypeVar("F", bound=Callable[..., Any])
RESERVED = ("warmup_steps",)


@dataclass(frozen=True)
class ScheduleKind:
    """A registered schedule: its shape, keyword parameters and how the kit treats it."""

    name: str
    shape: Shape
    params: dict[str, inspect.Parameter]
    durations: tuple[str, ...]
    needs_total: bool
    own_warmup: bool
    validate: Callable[[dict[str, Any]], None] | None = None
    #: The lr follows a monitored metric (plateau): its curve is flat, the metric's history scales it, and
    #: Lightning's config carries ``monitor``.
    follows_metric: bool = False

    def bind(self, kwargs: dict[str, Any], warmup_steps: int) -> Callable[[int, int | None], float]:
        """The shape with its keywords applied: a pickleable ``f(step, decay_steps) -> float``."""
        extra = {"warmup_steps": warmup_steps} if "warmup_steps" in self.reserved else {}
        if inspect.isclass(self.shape):
            return self.shape(**kwargs, **extra)
        return _Bound(self.shape, {**kwargs, **extra})

    @property
    def reserved(self) -> tuple[str, ...]:
        """Reserved keywords the shape declares (filled by the kit, not the user)."""
        target = self.shape.__init__ if inspect.isclass(self.shape) else self.shape
        return tuple(n for n in inspect.signature(target).parameters if n in RESERVED)


class _Bound:
    """A shape function with keywords bound (a partial that compares and prints clearly)."""

    def __init__(self, fn: Shape, kwargs: dict[str, Any]) -> None:
        self.fn = fn
        self.kwargs = kwargs

    def __call__(self, step: int, decay_steps: int | None) -> float:
        return self.fn(step, decay_steps, **self.kwargs)


_SCHEDULES: dict[str, ScheduleKind] = {}


def _keyword_params(name: str, obj: Any) -> dict[str, inspect.Parameter]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(obj):
        params = params[1:]  # self
    else:
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 2:
            raise TypeError(
                f"register_schedule({name!r}): the function must take (step, decay_steps, **kwargs)"
            )
        params = params[2:]
    out = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(
                f"register_schedule({name!r}): name every keyword; *args/**kwargs cannot be checked"
            )
        if p.name not in RESERVED:
            out[p.name] = p
    return out


def register_schedule(
    name: str,
    *,
    durations: Sequence[str] = (),
    needs_total: bool = True,
    validate: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
    _own_warmup: bool = False,
    _follows_metric: bool = False,
) -> Callable[[F], F]:
    """Decorator: make a shape function or class selectable as ``Schedule(name, ...)``.

    ``durations`` names keywords that take durations ("2ep", "10%", ...; resolved to the schedule's
    clock unit before the shape sees them). ``needs_total=False`` for shapes that work without a known
    fit length (they then receive ``decay_steps=None`` on infinite fits). ``validate(kwargs)`` may raise
    SpecError for bad keyword values at construction (durations arrive unresolved).
    """
    key = name.lower()

    def decorate(obj: F) -> F:
        if not callable(obj):
            raise TypeError(f"register_schedule({name!r}) expects a function or class, got {obj!r}")
        existing = _SCHEDULES.get(key)
        if existing is not None and existing.shape is not obj and not overwrite:
            raise ValueError(
                f"schedule name {name!r} is already registered; pass overwrite=True to replace it"
            )
        params = _keyword_params(name, obj)
        unknown = [d for d in durations if d not in params]
        if unknown:
            raise TypeError(f"register_schedule({name!r}): durations {unknown} are not keywords of the shape")
        _SCHEDULES[key] = ScheduleKind(key, obj, params, tuple(durations), needs_total, _own_warmup, validate,
                                       _follows_metric)
        return obj

    return decorate


def get_schedule_kind(name: Any, field: str = "schedule.name") -> ScheduleKind:
    """The registered schedule called ``name``; SpecError with a did-you-mean otherwise."""
    if not isinstance(name, str) or name.lower() not in _SCHEDULES:
        near = closest(str(name), _SCHEDULES) if isinstance(name, str) else []
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise SpecError(
            field,
            name,
            f"{hint}choose one of {sorted(_SCHEDULES)} or add one with lightning_optkit.register_schedule",
            problem="is not a known schedule",
        )
    return _SCHEDULES[name.lower()]


def schedule_names() -> list[str]:
    """All registered schedule names."""
    return sorted(_SCHEDULES)


# ---- keyword checks for the built-in shapes (called with raw and with resolved keywords) -----------


def _require(kwargs: dict[str, Any], key: str, fix: str, **bounds: Any) -> None:
    """Range-check ``kwargs[key]`` when it is a number (durations such as '2ep' are checked elsewhere)."""
    value = kwargs.get(key)
    if key in kwargs and isinstance(value, (int, float)) and not isinstance(value, bool):
        number(f"schedule.{key}", value, fix=fix, **bounds)


def _choose(kwargs: dict[str, Any], key: str, choices: Sequence[str]) -> None:
    if key in kwargs and kwargs[key] not in choices:
        raise SpecError(
            f"schedule.{key}", kwargs[key], f"choose one of {list(choices)}", problem="is not an option"
        )


def _positive_gamma(kwargs: dict[str, Any]) -> None:
    _require(kwargs, "gamma", "give gamma > 0 (e.g. 0.1)", positive=True)
    _require(kwargs, "step_size", "give step_size >= 1 step", at_least=1)
    milestones = kwargs.get("milestones")
    if "milestones" in kwargs and (
        isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence)
    ):
        raise SpecError(
            "schedule.milestones",
            milestones,
            "give a list of durations, e.g. [1000, 2000] or ['50%', '75%']",
            problem="is not a list",
        )
    if (
        milestones
        and all(isinstance(m, int) for m in milestones)
        and list(milestones) != sorted(set(milestones))
    ):
        raise SpecError(
            "schedule.milestones",
            list(milestones),
            "list the milestones in increasing order, without repeats",
            problem="is not increasing",
        )


def _check_restarts(kwargs: dict[str, Any]) -> None:
    _require(kwargs, "period", "give period >= 1 step", at_least=1)
    _require(kwargs, "period_mult", "give an integer period_mult >= 1", at_least=1, integer=True)


def _check_onecycle(kwargs: dict[str, Any]) -> None:
    _require(kwargs, "pct_start", "give pct_start in (0, 1), e.g. 0.3", positive=True, below_one=True)
    _require(kwargs, "div_factor", "give div_factor > 0", positive=True)
    _require(kwargs, "final_div_factor", "give final_div_factor > 0", positive=True)
    _choose(kwargs, "anneal_strategy", ("cos", "linear"))


def _check_plateau(kwargs: dict[str, Any]) -> None:
    monitor = kwargs.get("monitor")
    if not isinstance(monitor, str) or not monitor:
        raise SpecError(
            "schedule.monitor",
            monitor,
            "name the logged metric to watch, e.g. monitor='val_loss'",
            problem="is not a metric name",
        )
    _choose(kwargs, "mode", ("min", "max"))
    _choose(kwargs, "threshold_mode", ("rel", "abs"))
    _require(kwargs, "factor", "give factor in (0, 1), e.g. 0.1", positive=True, below_one=True)
    _require(kwargs, "patience", "give an integer patience >= 0", non_negative=True, integer=True)
    _require(kwargs, "cooldown", "give an integer cooldown >= 0", non_negative=True, integer=True)
    _require(kwargs, "threshold", "give threshold >= 0", non_negative=True)
    flag("schedule.strict", kwargs.get("strict", True), fix="give true or false")


# ---- built-in shapes ------------------------------------------------------------------------------


def _progress(step: int, decay_steps: int | None) -> float:
    return min(1.0, step / decay_steps) if decay_steps else 1.0


@register_schedule("constant", needs_total=False)
def constant(step: int, decay_steps: int | None) -> float:
    """No decay (use with warmup for a warmup-then-constant schedule)."""
    return 1.0


@register_schedule("linear")
def linear(step: int, decay_steps: int) -> float:
    """Linear decay to the floor at ``total`` (torch LinearLR(1, min_lr_ratio, total))."""
    return 1.0 - _progress(step, decay_steps)


@register_schedule("cosine")
def cosine(step: int, decay_steps: int) -> float:
    """Half-cosine decay to the floor at ``total`` (torch CosineAnnealingLR with T_max = total)."""
    return 0.5 * (1.0 + math.cos(math.pi * _progress(step, decay_steps)))


@register_schedule("cosine_restarts", durations=("period",), validate=_check_restarts)
def cosine_restarts(step: int, decay_steps: int, *, period: int | None = None, period_mult: int = 1) -> float:
    """Cosine cycles of ``period`` steps (default: one cycle), each ``period_mult`` times longer.

    At ``decay_steps`` (and after it, where the kit holds that value) a cycle ending exactly there is
    not restarted: the schedule ends at the bottom of its last cycle, not back at the full lr.
    """
    length = max(1, period or decay_steps)
    end = decay_steps is not None and step >= decay_steps
    if end:
        step = decay_steps
    if period_mult == 1:
        position = step % length
        if end and position == 0 and step > 0:
            position = length
    else:
        position = step
        while position > length or (position == length and not end):
            position -= length
            length *= int(period_mult)
    return 0.5 * (1.0 + math.cos(math.pi * position / length))


@register_schedule("polynomial", validate=lambda kw: _require(kw, "power", "give power > 0", positive=True))
def polynomial(step: int, decay_steps: int, *, power: float = 1.0) -> float:
    """``(1 - progress) ** power`` (torch PolynomialLR)."""
    return (1.0 - _progress(step, decay_steps)) ** power


@register_schedule("inverse_sqrt", durations=("timescale",), needs_total=False)
def inverse_sqrt(
    step: int, decay_steps: int | None, *, timescale: int | None = None, warmup_steps: int = 0
) -> float:
    """``sqrt(timescale / (step + timescale))``; timescale defaults to the warmup length (or 1 step)."""
    scale = timescale or max(warmup_steps, 1)
    return math.sqrt(scale / (step + scale))


@register_schedule("exponential", needs_total=False, validate=_positive_gamma)
def exponential(step: int, decay_steps: int | None, *, gamma: float) -> float:
    """``gamma ** step`` (torch ExponentialLR)."""
    return gamma**step


@register_schedule("step", durations=("step_size",), needs_total=False, validate=_positive_gamma)
def step_decay(step: int, decay_steps: int | None, *, step_size: int, gamma: float = 0.1) -> float:
    """``gamma`` every ``step_size`` steps after warmup (torch StepLR)."""
    return gamma ** (step // step_size)


@register_schedule("multistep", durations=("milestones",), needs_total=False, validate=_positive_gamma)
def multistep(
    step: int,
    decay_steps: int | None,
    *,
    milestones: Sequence[int],
    gamma: float = 0.1,
    warmup_steps: int = 0,
) -> float:
    """``gamma`` at each milestone, counted from the start of training (torch MultiStepLR)."""
    return gamma ** bisect_right(list(milestones), step + warmup_steps)


@register_schedule(
    "inverse_time",
    needs_total=False,
    validate=lambda kw: _require(kw, "lr_decay", "give lr_decay >= 0", non_negative=True),
)
def inverse_time(step: int, decay_steps: int | None, *, lr_decay: float) -> float:
    """``1 / (1 + lr_decay * step)``: Adagrad's ``lr_decay`` for any optimizer."""
    return 1.0 / (1.0 + lr_decay * step)


_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


@register_schedule("wsd", durations=("decay",), validate=lambda kw: _choose(kw, "decay_shape", _WSD_SHAPES))
def wsd(step: int, decay_steps: int, *, decay: int | float | str = 0.1, decay_shape: str = "linear") -> float:
    """Warmup-stable-decay: hold 1.0, then decay over the last ``decay`` (linear, cosine or 1-sqrt)."""
    decay = min(decay, decay_steps)
    stable = decay_steps - decay
    if step < stable or decay <= 0:
        return 1.0
    q = min(1.0, (step - stable) / decay)
    if decay_shape == "linear":
        return 1.0 - q
    if decay_shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * q))
    return 1.0 - math.sqrt(q)


def _anneal(start: float, end: float, pct: float, strategy: str) -> float:
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


@register_schedule("onecycle", validate=_check_onecycle, _own_warmup=True)
def onecycle(
    step: int,
    decay_steps: int,
    *,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: str = "cos",
    three_phase: bool = False,
) -> float:
    """The 1cycle policy relative to the group's lr (torch OneCycleLR with max_lr = the group's lr,
    ``cycle_momentum=False``); holds its final value from step ``total - 1`` on. A rise of one step
    (``pct_start * total == 1``) starts at the peak."""
    step = min(step, decay_steps - 1)
    initial, peak, final = 1.0 / div_factor, 1.0, 1.0 / (div_factor * final_div_factor)
    rise_end = pct_start * decay_steps - 1
    if three_phase:
        phases = [
            (rise_end, initial, peak),
            (2 * pct_start * decay_steps - 2, peak, initial),
            (decay_steps - 1, initial, final),
        ]
    else:
        phases = [(rise_end, initial, peak), (decay_steps - 1, peak, final)]
    start = 0.0
    for i, (end, lo, hi) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            # a phase of no length (pct_start * total == 1 step: the rise is step 0 alone) is at its end
            # value, where torch's OneCycleLR divides by zero
            pct = (step - start) / (end - start) if end > start else 1.0
            return _anneal(lo, hi, pct, anneal_strategy)
        start = end
    raise AssertionError("unreachable")


@register_schedule("plateau", needs_total=False, validate=_check_plateau, _follows_metric=True)
def plateau(
    step: int,
    decay_steps: int | None,
    *,
    monitor: str,
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    strict: bool = True,
) -> float:
    """ReduceLROnPlateau on ``monitor``; see :mod:`lightning_optkit.schedules.plateau`.

    The curve itself is flat (1.0 after warmup): the plateau factor, driven by the metric, scales it.
    """
    return 1.0
