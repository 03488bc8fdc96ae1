"""The step view: one object per (Trainer, optimizer, step) that every gradient stage reads and writes.

:func:`step_view` builds it at the first stage of an optimizer step and hands the same object to the
others: the raw optimizer, its index and metric scope, the parameters with a gradient and those
gradients, whether the batch logs, the gradient norms (computed once: the first stage to need a norm
computes every norm type the Trainer's stages declare, :mod:`lightning_optkit.callbacks.stages`), and
what the stages decided: a gradient scale deferred to a kit optimizer's step, gradients changed in
place (so a later stage reads the norms of the gradients as the step will use them), the skip flag.
Kept per Trainer.
"""

from __future__ import annotations

import weakref
from functools import cached_property

import lightning.pytorch as pl
import torch

from lightning_optkit.callbacks.cadence import is_logging_step
from lightning_optkit.callbacks.naming import metric_scope, optimizer_index, optimizer_labels
from lightning_optkit.callbacks.stages import declared_norm_types
from lightning_optkit.internals import tensor_version
from lightning_optkit.norms import tensor_norms
from lightning_optkit.optim.modifiers import accepts_step_modifiers
from lightning_optkit.sharding import local_tensors
from lightning_optkit.unwrap import raw_optimizer


def grad_params(optimizer: torch.optim.Optimizer, skip_ids: frozenset[int] = frozenset()
                ) -> list[torch.nn.Parameter]:
    """Parameters of ``optimizer`` that hold a gradient, in param-group order, minus ``skip_ids``.

    A sparse gradient (``nn.Embedding(sparse=True)``) is coalesced in place (``p.grad`` replaced by its
    coalesced form, once per step): its values are then the tensor's entries, which norms, clipping and
    the non-finite check read, and the optimizer's own ``coalesce`` costs nothing. On CUDA coalescing
    syncs with the host (its output size depends on the data), as the sparse optimizers' step does anyway.
    """
    groups = optimizer.param_groups
    out = [p for group in groups for p in group["params"] if p.grad is not None]
    for p in out:
        if p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()
    if len({id(p) for p in out}) != len(out):  # a parameter listed twice (torch only warns within a group)
        out = list({id(p): p for p in out}.values())
    if skip_ids:
        out = [p for p in out if id(p) not in skip_ids]
    return out


def _versions(grads: list[torch.Tensor]) -> list[int]:
    # Under FSDP2 the local shard's counter: the kit and users write gradients through their shards.
    return [tensor_version(g) for g in local_tensors(grads)]


def _subset(params: list[torch.nn.Parameter], norms: list[torch.Tensor], skip_ids: frozenset[int]
            ) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    if not skip_ids:
        return params, norms
    kept = [i for i, p in enumerate(params) if id(p) not in skip_ids]
    return [params[i] for i in kept], [norms[i] for i in kept]


class StepView:
    """One optimizer step as the gradient stages see it (see the module docstring); build with :func:`step_view`.

    Attributes: ``raw`` (the torch optimizer), ``index`` (its position in ``trainer.optimizers``),
    ``params`` / ``grads`` (every parameter with a gradient, in param-group order, and its gradient),
    ``logging`` (the batch logs, ``Trainer(log_every_n_steps)``), ``accepts_modifiers`` (the optimizer takes a
    deferred scale and skip), ``deferred`` (the product of the scales deferred to it at this step, or None),
    ``skip`` (the skip flag decided at this step, a 0-d device bool, or None). ``scope`` and ``label`` name it
    in metric keys. Norms: :meth:`pre_norms` (before any stage changed the gradients), :meth:`current_norms`
    (as the step will use them).
    """

    def __init__(self, trainer: pl.Trainer, raw: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 grads: list[torch.Tensor], key: tuple) -> None:
        self.key = key
        self.raw = raw
        self.params = params
        self.grads = grads
        self.index = optimizer_index(trainer, raw)
        self.logging = is_logging_step(trainer)
        self.accepts_modifiers = accepts_step_modifiers(raw)
        self.deferred: torch.Tensor | None = None
        self.skip: torch.Tensor | None = None
        # per norm type, the norms of ALL the gradients before any stage modified them (empty until asked)
        self.pre: dict[float, list[torch.Tensor]] = {}
        self.rescan = False  # a stage changed the gradients in place since `pre` was measured
        self.versions: list[int] | None = None  # the gradients' version counters when last measured or noted
        # weak: the view lives in a per-Trainer weak-keyed store, which must not keep its Trainer alive
        self._refs = [weakref.ref(g) for g in grads]
        self._trainer = weakref.ref(trainer)

    def same_gradients(self, grads: list[torch.Tensor]) -> bool:
        """Whether ``grads`` are the very tensors this view was built on (ids alone can be reused)."""
        return all(ref() is g for ref, g in zip(self._refs, grads))

    @cached_property
    def scope(self) -> str:
        """``""`` with one optimizer, else ``"<label>/"``: the prefix of the callbacks' metric keys."""
        trainer = self._trainer()
        return "" if trainer is None else metric_scope(trainer, self.raw)

    @cached_property
    def label(self) -> str:
        """The optimizer's label (kit spec name, else class name; repeats ``-1``, ``-2``)."""
        trainer = self._trainer()
        labels = optimizer_labels(trainer) if trainer is not None else []
        return labels[self.index] if self.index < len(labels) else str(self.index)

    # ------------------------------------------------------------------------------------------- norms
    def _measure(self, types: set[float]) -> None:
        trainer = self._trainer()
        declared = declared_norm_types(trainer) if trainer is not None else []
        self.pre = {t: tensor_norms(self.grads, t) for t in {*types, *declared}}
        self.versions = _versions(self.grads)

    def _pre(self, norm_type: float) -> list[torch.Tensor]:
        if not self.pre:
            self._measure({norm_type})
        elif norm_type not in self.pre:  # undeclared norm type: computed now, on the gradients as they are
            self.pre[norm_type] = tensor_norms(self.grads, norm_type)
        return self.pre[norm_type]

    def pre_norms(self, norm_type: float, skip_ids: frozenset[int] = frozenset()
                  ) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        """Parameters with a gradient (minus ``skip_ids``) and their norms before any stage modified them:
        what reports or judges the gradient the backward produced (the guard, the monitor) reads."""
        return _subset(self.params, self._pre(float(norm_type)), skip_ids)

    def current_norms(self, norm_type: float, skip_ids: frozenset[int] = frozenset()
                      ) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        """Like :meth:`pre_norms`, of the gradients as the step will use them: after a stage changed them in
        place, measured again; times the scale deferred to the optimizer so far."""
        norm_type = float(norm_type)
        pre = self._pre(norm_type)
        norms = tensor_norms(self.grads, norm_type) if self.rescan else pre
        if self.deferred is not None:
            norms = [n * self.deferred.to(n.device, n.dtype) for n in norms]
        return _subset(self.params, norms, skip_ids)

    # ----------------------------------------------------------------------------------- what stages did
    def note_modified(self, deferred_scale: torch.Tensor | None = None) -> None:
        """Record that a stage changed the gradients in place, or deferred ``deferred_scale`` to the step."""
        if not self.pre:
            return  # nobody read norms at this step: nothing to keep in line
        if deferred_scale is None:
            self.rescan = True
        else:
            self.deferred = deferred_scale if self.deferred is None else self.deferred * deferred_scale
        grads = [ref() for ref in self._refs]
        self.versions = [-1 if g is None else _versions([g])[0] for g in grads]  # the change is known

    def defer_scale(self, scale: torch.Tensor) -> None:
        """Hand the 0-d device ``scale`` to the optimizer's step (``accepts_modifiers`` must be true)."""
        self.raw.defer_grad_scale(scale)  # type: ignore[attr-defined]
        self.note_modified(deferred_scale=scale)

    def decided_skip(self, flag: torch.Tensor) -> None:
        """Record the step's skip flag (OR-ed with an earlier one); the deciding stage applies it."""
        self.skip = flag if self.skip is None else self.skip | flag

    def take_deferred_scale(self) -> torch.Tensor | None:
        """Take back the gradient scale earlier stages deferred to the optimizer's step at this step.

        For an element-wise clip (value, AGC) after a deferred global coefficient: it must act on the
        gradients the step will use, so the caller applies the returned scale to them first. A deferred
        skip flag stays deferred. None when nothing was deferred.
        """
        pop = getattr(self.raw, "pop_step_modifiers", None)
        if not self.pre or self.deferred is None or pop is None:
            return None
        scale, skip = pop()
        if skip is not None:
            self.raw.defer_skip(skip)  # type: ignore[attr-defined]
        self.deferred = None
        self.rescan = True  # the caller is about to scale the gradients in place
        return scale


# One view per Trainer is enough: Lightning runs every callback for one optimizer step before the
# next optimizer's. A view is reused only for the same optimizer and step and the very same gradient
# tensors: ids alone are not enough, as a gradient replaced within a step (LBFGS re-runs the
# closure: zero_grad, then backward) can get a freed one's address. And its norms only while the
# gradients' contents are the ones measured: a gradient changed in place by something other than a
# stage (which reports its changes, StepView.note_modified), e.g. a user callback writing an inf, is
# measured again. Keyed weakly by Trainer, so two Trainers in one process (a fit inside a callback, a
# tuner) never share a view, and a finished Trainer's view goes with it.
_STEP_NORMS: weakref.WeakKeyDictionary[pl.Trainer, StepView] = weakref.WeakKeyDictionary()


def step_view(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> StepView:
    """The view of ``optimizer``'s (raw or LightningOptimizer-wrapped) current step, built at its first call."""
    raw = raw_optimizer(optimizer)
    params = grad_params(raw)
    grads = [p.grad for p in params]
    key = (id(raw), trainer.global_step, len(grads))
    view = _STEP_NORMS.get(trainer)
    if view is None or view.key != key or not view.same_gradients(grads):
        view = _STEP_NORMS[trainer] = StepView(trainer, raw, params, grads, key)
    elif view.pre and view.versions != _versions(grads):  # changed in place without note_modified
        view._measure(set(view.pre))
        view.rescan = False  # `pre` now holds the gradients as they are (a deferred scale still applies)
    return view


def step_grad_norms(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, norm_type: float,
                    skip_ids: frozenset[int] = frozenset()
                    ) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """``step_view(trainer, optimizer).pre_norms(norm_type, skip_ids)``."""
    return step_view(trainer, optimizer).pre_norms(norm_type, skip_ids)


def current_grad_norms(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, norm_type: float,
                       skip_ids: frozenset[int] = frozenset()
                       ) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """``step_view(trainer, optimizer).current_norms(norm_type, skip_ids)``."""
    return step_view(trainer, optimizer).current_norms(norm_type, skip_ids)


def note_grads_modified(trainer: pl.Trainer, optimizer: torch.optim.Optimizer,
                        deferred_scale: torch.Tensor | None = None) -> None:
    """Record on the current view that a stage changed the gradients or deferred ``deferred_scale``."""
    view = _STEP_NORMS.get(trainer)
    if view is not None and view.key[0] == id(raw_optimizer(optimizer)):
        view.note_modified(deferred_scale)
