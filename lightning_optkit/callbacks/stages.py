"""The contract between the kit's gradient callbacks, and the one rule that orders them.

At every optimizer step Lightning calls ``on_before_optimizer_step`` of each callback in
``trainer.callbacks`` order. Three kit callbacks act on the gradients there, each in one declared
role (:data:`GRADIENT_ROLES`):

- ``observe``: reads the gradients and their norms, changes nothing (OptimizerMonitor);
- ``modify``: changes the gradients, in place or as a deferred scale (GradientClipping);
- ``decide``: decides whether the step runs (NonFiniteGuard; its plain-torch skip drops the gradients).

So observers run first (they log the gradients as backward left them), modifiers next, deciders
last (they judge what the step will use, and the others must still see a broken step's gradients).
:func:`order_gradient_stages` applies that rule, in one place; every stage calls it at setup. It
never moves a modifier, so the user's own callbacks keep their place relative to clipping.

Each stage also declares the norm types it reads (``grad_norm_types``): the first stage to need a
norm at a step computes every declared type in one pass, and the others reuse them. A stage that
reports its clipping to the monitor is a :class:`ClipReport`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

GradientRole = Literal["observe", "modify", "decide"]
#: The roles in the order their stages run at the optimizer step.
GRADIENT_ROLES: tuple[GradientRole, ...] = ("observe", "modify", "decide")


@runtime_checkable
class GradientStage(Protocol):
    """A callback acting on the gradients in ``on_before_optimizer_step``, in one declared role."""

    gradient_role: ClassVar[GradientRole]

    @property
    def grad_norm_types(self) -> tuple[float, ...]:
        """The gradient norm types it reads at the step (computed once per step for all stages)."""
        ...


@runtime_checkable
class ClipReport(Protocol):
    """A stage that reports its clipping: the step's total norm and clip coefficient, 0-d device tensors
    (None before the first step). OptimizerMonitor logs ``total_clipped`` and ``clip_coef`` from them."""

    last_total_norm: torch.Tensor | None
    last_clip_coef: torch.Tensor | None


def role_of(callback: object) -> str | None:
    """The gradient role ``callback`` declares (``gradient_role``), or None for any other callback."""
    return getattr(callback, "gradient_role", None)


def is_gradient_stage(callback: object) -> bool:
    """Whether ``callback`` declares a gradient role (one of :data:`GRADIENT_ROLES`)."""
    return role_of(callback) in GRADIENT_ROLES


def gradient_stages(trainer: pl.Trainer, role: GradientRole | None = None) -> list[GradientStage]:
    """The Trainer's gradient stages in run order, all or those of one role."""
    return [cb for cb in trainer.callbacks if is_gradient_stage(cb) and role in (None, role_of(cb))]


def clip_reports(trainer: pl.Trainer) -> list[ClipReport]:
    """The Trainer's stages that report their clipping, in run order."""
    return [cb for cb in gradient_stages(trainer, "modify") if isinstance(cb, ClipReport)]


def declared_norm_types(trainer: pl.Trainer) -> list[float]:
    """Every norm type a stage of the Trainer reads (with repeats; the caller takes the set)."""
    return [float(t) for cb in gradient_stages(trainer) for t in cb.grad_norm_types]


def _without(callbacks: list[Callback], moving: list[Callback]) -> list[Callback]:
    return [cb for cb in callbacks if not any(cb is m for m in moving)]


def _position(callbacks: list[Callback], callback: Callback) -> int:
    return next(i for i, cb in enumerate(callbacks) if cb is callback)


def order_gradient_stages(trainer: pl.Trainer) -> None:
    """Put the Trainer's gradient stages in role order: observe, modify, decide.

    Modifiers never move, so every other callback stays on the same side of each of them (a user
    callback listed after GradientClipping sees clipped gradients). Observers listed after the first
    modifier move just ahead of it; deciders listed before the last observer or modifier move just
    behind it; each keeps its order among its role. Idempotent; the list is replaced, not edited, so
    a hook loop Lightning is running over the old list (stages call this from ``setup``) still visits
    each callback once, as when Lightning adds a module's ``configure_callbacks``.
    """
    callbacks = list(trainer.callbacks)
    modifiers = [cb for cb in callbacks if role_of(cb) == "modify"]
    if modifiers:
        first = _position(callbacks, modifiers[0])
        late = [cb for cb in callbacks[first:] if role_of(cb) == "observe"]
        callbacks = _without(callbacks, late)
        at = _position(callbacks, modifiers[0])
        callbacks[at:at] = late
    readers = [i for i, cb in enumerate(callbacks) if role_of(cb) in ("observe", "modify")]
    if readers:
        early = [cb for cb in callbacks[:readers[-1]] if role_of(cb) == "decide"]
        last_reader = callbacks[readers[-1]]
        callbacks = _without(callbacks, early)
        at = _position(callbacks, last_reader) + 1
        callbacks[at:at] = early
    if any(a is not b for a, b in zip(callbacks, trainer.callbacks)):
        trainer.callbacks = callbacks
