"""The gradients of the optimizer step being processed and their norms, computed once and shared.

The first gradient stage to need a norm at a step computes every norm type the Trainer's stages
declare (:mod:`lightning_optkit.callbacks.stages`); the others reuse them. What a clipping stage
changed (in place, or as a scale deferred to a kit optimizer's step) is recorded, so a later stage
reads the norms of the gradients as the step will use them. Kept per Trainer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from lightning_optkit.callbacks.stages import declared_norm_types
from lightning_optkit.internals import tensor_version
from lightning_optkit.norms import tensor_norms
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


@dataclass
class _StepNorms:
    """The gradient norms of the optimizer step being processed, shared by the callbacks.

    ``pre`` holds, per norm type, the norms of ALL the optimizer's gradients before any callback
    modified them (computed by the first callback to ask, for every norm type a registered callback
    declares in ``grad_norm_types``). ``rescan`` and ``deferred`` record what clipping callbacks did
    since: changed gradients in place, or deferred a scale to a kit optimizer's step.
    """

    key: tuple
    refs: list[weakref.ref]
    pre: dict[float, list[torch.Tensor]]
    rescan: bool = False
    deferred: torch.Tensor | None = None
    versions: list[int] | None = None  # the gradients' version counters when last measured or noted


# One entry per Trainer is enough: Lightning runs every callback for one optimizer step before the
# next optimizer's. An entry is reused only for the same optimizer and step and the very same gradient
# tensors: ids alone are not enough, as a gradient replaced within a step (LBFGS re-runs the
# closure: zero_grad, then backward) can get a freed one's address. And only while their contents are
# the ones measured: a gradient changed in place by something other than the kit's clipping (which
# reports its changes, note_grads_modified), e.g. a user callback writing an inf, is measured again.
# Keyed weakly by Trainer, so two Trainers in one process (a fit inside a callback, a tuner) never
# share an entry, and a finished Trainer's entry goes with it.
_STEP_NORMS: weakref.WeakKeyDictionary[pl.Trainer, _StepNorms] = weakref.WeakKeyDictionary()


def _versions(grads: list[torch.Tensor]) -> list[int]:
    # Under FSDP2 the local shard's counter: the kit and users write gradients through their shards.
    return [tensor_version(g) for g in local_tensors(grads)]


def _step_entry(trainer: pl.Trainer, raw: torch.optim.Optimizer, grads: list[torch.Tensor],
                norm_type: float) -> _StepNorms:
    key = (id(raw), trainer.global_step, len(grads))
    entry = _STEP_NORMS.get(trainer)
    if entry is None or entry.key != key or not all(ref() is g for ref, g in zip(entry.refs, grads)):
        norms = {t: tensor_norms(grads, t) for t in {norm_type, *declared_norm_types(trainer)}}
        refs = [weakref.ref(g) for g in grads]
        entry = _STEP_NORMS[trainer] = _StepNorms(key, refs, norms, versions=_versions(grads))
    elif entry.versions != _versions(grads):  # changed in place without note_grads_modified: measure again
        entry.pre = {t: tensor_norms(grads, t) for t in entry.pre}
        entry.rescan = False  # `pre` now holds the gradients as they are (a deferred scale still applies)
        entry.versions = _versions(grads)
    if norm_type not in entry.pre:  # undeclared norm type: computed now, on the gradients as they are
        entry.pre[norm_type] = tensor_norms(grads, norm_type)
    return entry


def _subset(params: list[torch.nn.Parameter], norms: list[torch.Tensor], skip_ids: frozenset[int]
            ) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    if not skip_ids:
        return params, norms
    kept = [i for i, p in enumerate(params) if id(p) not in skip_ids]
    return [params[i] for i in kept], [norms[i] for i in kept]


def step_grad_norms(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, norm_type: float,
                    skip_ids: frozenset[int] = frozenset()
                    ) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """Parameters with a gradient (minus ``skip_ids``) and their norms before any callback modified them.

    Shared by all callbacks at one optimizer step: the first call computes the norms of all of
    ``optimizer``'s gradients (one foreach pass per norm type declared by a callback's
    ``grad_norm_types``); later calls, whatever their parameter subset, reuse them. What reports or
    judges the gradient the backward produced (the guard, the monitor) reads these.
    """
    raw = raw_optimizer(optimizer)
    params = grad_params(raw)
    grads = [p.grad for p in params]
    entry = _step_entry(trainer, raw, grads, float(norm_type))
    return _subset(params, entry.pre[float(norm_type)], skip_ids)


def current_grad_norms(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, norm_type: float,
                       skip_ids: frozenset[int] = frozenset()
                       ) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """Like :func:`step_grad_norms`, but of the gradients the optimizer will use as they stand now.

    Equal to it until a callback modifies the gradients (see :func:`note_grads_modified`); after
    that, a second clipping callback gets the norms of the already-clipped gradients, times any scale
    an earlier one deferred to the optimizer.
    """
    raw = raw_optimizer(optimizer)
    params = grad_params(raw)
    grads = [p.grad for p in params]
    entry = _step_entry(trainer, raw, grads, float(norm_type))
    norms = tensor_norms(grads, norm_type) if entry.rescan else entry.pre[float(norm_type)]
    if entry.deferred is not None:
        norms = [n * entry.deferred.to(n.device, n.dtype) for n in norms]
    return _subset(params, norms, skip_ids)


def note_grads_modified(trainer: pl.Trainer, optimizer: torch.optim.Optimizer,
                        deferred_scale: torch.Tensor | None = None) -> None:
    """Record that a callback changed the gradients in place, or deferred ``deferred_scale`` to the step."""
    raw = raw_optimizer(optimizer)
    entry = _STEP_NORMS.get(trainer)
    if entry is None or entry.key[0] != id(raw):
        return  # nobody read norms at this step: nothing to keep in line
    # the caller read this step's entry just before modifying: no need to check the step again
    if deferred_scale is None:
        entry.rescan = True
    else:
        entry.deferred = deferred_scale if entry.deferred is None else entry.deferred * deferred_scale
    grads = [ref() for ref in entry.refs]
    entry.versions = [-1 if g is None else _versions([g])[0] for g in grads]  # the change is known


def take_deferred_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Take back the gradient scale an earlier callback deferred to ``optimizer``'s step at this step.

    For an element-wise clip (value, AGC) after a deferred global coefficient: it must act on the
    gradients the step will use, so the caller applies the returned scale to them first. A deferred
    skip flag stays deferred. None when nothing was deferred.
    """
    raw = raw_optimizer(optimizer)
    entry = _STEP_NORMS.get(trainer)
    pop = getattr(raw, "pop_step_modifiers", None)
    if entry is None or entry.key[0] != id(raw) or entry.deferred is None or pop is None:
        return None
    scale, skip = pop()
    if skip is not None:
        raw.defer_skip(skip)
    entry.deferred = None
    entry.rescan = True  # the caller is about to scale the gradients in place
    return scale
