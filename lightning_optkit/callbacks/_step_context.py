"""Shared plumbing for callbacks acting in ``on_before_optimizer_step``.

Private to :mod:`lightning_optkit.callbacks`: which step logs, how an optimizer is named in metric
keys, the gradients it will use, their norms (computed once per step and shared between callbacks),
GradScaler unscaling and the skip flags of fused optimizers. Every use of Lightning/torch internals
by the callbacks lives in this module, each with a comment saying why there is no public route.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_optkit.callbacks.stages import declared_norm_types
from lightning_optkit.errors import SpecError
from lightning_optkit.norms import tensor_norms
from lightning_optkit.sharding import check_placements, local_tensors

__all__ = [
    "LeanCallback",
    "active_scaler",
    "arm_fused_skip",
    "check_sharded_layout",
    "current_grad_norms",
    "disarm_fused_skip",
    "ensure_unscaled",
    "grad_params",
    "group_labels",
    "is_fused_amp_optimizer",
    "is_logging_step",
    "logger_step",
    "mark_scaler_skip",
    "metric_scope",
    "note_grads_modified",
    "optimizer_index",
    "optimizer_labels",
    "refuse_sharded_strategy",
    "step_grad_norms",
    "take_deferred_scale",
]


# ------------------------------------------------------------------ hook dispatch
#: Hooks Lightning calls once per batch (or more often); the per-epoch ones cost nothing that matters.
PER_BATCH_HOOKS = (
    "on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_before_zero_grad", "on_validation_batch_start", "on_validation_batch_end",
    "on_test_batch_start", "on_test_batch_end", "on_predict_batch_start", "on_predict_batch_end",
)


class LeanCallback(Callback):
    """Base of the kit's callbacks: per-batch hooks the class leaves at Callback's no-op are not dispatched.

    Lightning calls every hook of every callback, each inside a profiler context, about 1.5-3 us per
    call on a CPU: for a callback using one of the ~6 per-step hooks of a fit that is 10-15 us of
    every step (0.5% of a 2.4 ms step). Lightning's dispatcher (``trainer/call.py``,
    ``_call_callback_hooks``) skips a hook attribute that is not callable; there is no public way to
    declare the hooks a callback uses, so each instance gets ``None`` for the per-batch hooks its
    class does not override. Overrides in subclasses are kept, and ``super().on_...()`` still
    resolves to Callback's methods. The one visible difference: calling such a hook on the instance
    directly (``callback.on_train_batch_start(...)``) raises TypeError; code that forwards hooks to
    other callbacks should check ``callable()`` first, as Lightning does. Measured on the monitor
    benchmark (2.4 ms steps, clipping + monitor): 1.014x with, 1.027x without.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> LeanCallback:
        self = super().__new__(cls)
        for name in PER_BATCH_HOOKS:
            if getattr(cls, name) is getattr(Callback, name):
                setattr(self, name, None)
        return self


# ------------------------------------------------------------------ strategies
def refuse_sharded_strategy(trainer: pl.Trainer, callback: str, fix: str) -> None:
    """Raise a SpecError under FSDP1 (``FSDPStrategy``) or DeepSpeed, whose sharding the kit cannot see.

    FSDP1 flattens parameters into per-rank flat buffers and DeepSpeed keeps its own partitions, so
    norms, clip coefficients and skip decisions computed from ``optimizer.param_groups`` would be
    per-shard and could differ between ranks: wrong, silently. FSDP2 under ``ModelParallelStrategy``
    keeps every parameter a DTensor, whose whole-tensor norms the kit reduces across ranks (see
    :mod:`lightning_optkit.sharding`), and DDP gives every rank the reduced gradients: both are fine.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise SpecError("Trainer(strategy)", type(strategy).__name__,
                        "shard with FSDP2 instead: Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, "
                        f"tensor_parallel_size=1)) and fully_shard in configure_model, where {callback} is "
                        f"exact; or {fix}",
                        problem=f"shards the parameters in flat buffers, so {callback} would see each rank's "
                        "shard only")


def check_sharded_layout(pl_module: pl.LightningModule, callback: str) -> None:
    """Refuse (SpecError naming the parameter) a trainable DTensor whose layout has no exact whole-tensor norm.

    Called when training starts, after ``configure_model`` has sharded the module.
    """
    check_placements(((name, p) for name, p in pl_module.named_parameters() if p.requires_grad), callback)


# ------------------------------------------------------------------ logging cadence
def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's logging uses for the current training batch (batches that stepped).

    Lightning's ``self.log`` rows and its LearningRateMonitor both use
    ``fit_loop.epoch_loop._batches_that_stepped``, which counts batches that stepped (once per batch,
    whatever the number of optimizers). There is no public equivalent: ``trainer.global_step`` counts
    every optimizer's steps in manual optimization. This is the callbacks' only read of it.
    """
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return int(stepped) if stepped is not None else trainer.global_step


def is_logging_step(trainer: pl.Trainer, every_n_steps: int | None = None) -> bool:
    """Whether the current training batch logs, every ``every_n_steps`` batches that stepped.

    ``None`` follows ``Trainer(log_every_n_steps)``. The rule is Lightning's own (its logger
    connector's ``should_update_logs``): ``(logger_step + 1) % every == 0``, or the Trainer was told
    to stop (so the last row before an early stop is written); never when ``every`` is 0. The one
    decision used by GradientClipping, NonFiniteGuard and OptimizerMonitor.
    """
    every = trainer.log_every_n_steps if every_n_steps is None else every_n_steps
    if every < 1:
        return False
    return (logger_step(trainer) + 1) % every == 0 or bool(trainer.should_stop)


# ------------------------------------------------------------------ optimizer names
def optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    """Position of ``optimizer`` (raw or LightningOptimizer-wrapped) in ``trainer.optimizers``."""
    raw = getattr(optimizer, "optimizer", optimizer)
    for i, opt in enumerate(trainer.optimizers):
        if opt is raw or opt is optimizer:
            return i
    return 0


def optimizer_labels(trainer: pl.Trainer) -> list[str]:
    """One label per optimizer in ``trainer.optimizers``, used in every callback's metric keys.

    An optimizer built from a kit spec is labelled by the spec's name (``optimizer.optkit_name``,
    set by :mod:`lightning_optkit.build`); any other by its class name. Repeats get ``-1``, ``-2``...
    (``Adam``, ``Adam-1``), as Lightning's LearningRateMonitor names them.
    """
    return _unique([_label_of(getattr(opt, "optimizer", opt)) for opt in trainer.optimizers])


def _unique(bases: list[str]) -> list[str]:
    """``bases`` with repeats made unique by ``-1``, ``-2``... (``Adam``, ``Adam-1``)."""
    out: list[str] = []
    used: set[str] = set()
    for base in bases:
        label, n = base, 0
        while label in used:
            n += 1
            label = f"{base}-{n}"
        used.add(label)
        out.append(label)
    return out


def _own_group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [str(g.get("name", f"pg{i}")) for i, g in enumerate(optimizer.param_groups)]


def group_labels(optimizer: torch.optim.Optimizer) -> list[str]:
    """One label per entry of ``optimizer.param_groups``: the group's ``"name"``, else ``pg<index>``.

    A :class:`~lightning_optkit.optim.ChainedOptimizer` concatenates its members' groups, which are
    often named alike (every kit member has a ``default`` group), so there each is labelled
    ``<member>/<group>``: the member's kit spec name, else its class name (repeats ``-1``, ``-2``),
    and the group's label within that member. The labels every callback's group-level keys use.
    """
    from lightning_optkit.optim.chained import ChainedOptimizer

    raw = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(raw, ChainedOptimizer):
        return _own_group_names(raw)
    members = _unique([_label_of(member) for member in raw.optimizers])
    return [f"{member}/{group}" for member, opt in zip(members, raw.optimizers, strict=True)
            for group in _own_group_names(opt)]


def _label_of(raw: torch.optim.Optimizer) -> str:
    base = getattr(raw, "optkit_name", None)
    return base if isinstance(base, str) and base else type(raw).__name__


def metric_scope(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> str:
    """``""`` with one optimizer, else ``"<label>/"`` (see :func:`optimizer_labels`) for ``optimizer``."""
    if len(trainer.optimizers) < 2:
        return ""
    return optimizer_labels(trainer)[optimizer_index(trainer, optimizer)] + "/"


# ------------------------------------------------------------------ gradients and their norms
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


# One entry is enough: Lightning runs every callback for one optimizer step before the next
# optimizer's. An entry is reused only for the same optimizer and step and the very same gradient
# tensors: ids alone are not enough, as a gradient replaced within a step (LBFGS re-runs the
# closure: zero_grad, then backward) can get a freed one's address. And only while their contents are
# the ones measured: a gradient changed in place by something other than the kit's clipping (which
# reports its changes, note_grads_modified), e.g. a user callback writing an inf, is measured again.
_STEP_NORMS: list[_StepNorms | None] = [None]


def _versions(grads: list[torch.Tensor]) -> list[int]:
    # Tensor._version counts in-place writes; torch has no public equivalent (plateau.py reads it too).
    # Under FSDP2 the local shard's counter: the kit and users write gradients through their shards.
    return [g._version for g in local_tensors(grads)]


def _step_entry(trainer: pl.Trainer, raw: torch.optim.Optimizer, grads: list[torch.Tensor],
                norm_type: float) -> _StepNorms:
    key = (id(raw), trainer.global_step, len(grads))
    entry = _STEP_NORMS[0]
    if entry is None or entry.key != key or not all(ref() is g for ref, g in zip(entry.refs, grads)):
        norms = {t: tensor_norms(grads, t) for t in {norm_type, *declared_norm_types(trainer)}}
        entry = _STEP_NORMS[0] = _StepNorms(key, [weakref.ref(g) for g in grads], norms, versions=_versions(grads))
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
    raw = getattr(optimizer, "optimizer", optimizer)
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
    raw = getattr(optimizer, "optimizer", optimizer)
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
    raw = getattr(optimizer, "optimizer", optimizer)
    entry = _STEP_NORMS[0]
    if entry is None or entry.key[0] != id(raw):
        return  # nobody read norms at this step: nothing to keep in line
    # the caller read this step's entry just before modifying: no need to check the step again
    if deferred_scale is None:
        entry.rescan = True
    else:
        entry.deferred = deferred_scale if entry.deferred is None else entry.deferred * deferred_scale
    grads = [ref() for ref in entry.refs]
    entry.versions = [-1 if g is None else _versions([g])[0] for g in grads]  # the change is known


def take_deferred_scale(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Take back the gradient scale an earlier callback deferred to ``optimizer``'s step at this step.

    For an element-wise clip (value, AGC) after a deferred global coefficient: it must act on the
    gradients the step will use, so the caller applies the returned scale to them first. A deferred
    skip flag stays deferred. None when nothing was deferred.
    """
    raw = getattr(optimizer, "optimizer", optimizer)
    entry = _STEP_NORMS[0]
    pop = getattr(raw, "pop_step_modifiers", None)
    if entry is None or entry.key[0] != id(raw) or entry.deferred is None or pop is None:
        return None
    scale, skip = pop()
    if skip is not None:
        raw.defer_skip(skip)
    entry.deferred = None
    entry.rescan = True  # the caller is about to scale the gradients in place
    return scale


# ------------------------------------------------------------------ AMP and skip flags
def is_fused_amp_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """A torch optimizer whose fused step reads ``found_inf`` / ``grad_scale`` attributes.

    torch's fused Adam/AdamW/SGD/Adagrad set ``_step_supports_amp_scaling`` (the flag GradScaler
    itself checks) and pass ``getattr(self, "found_inf", None)`` to the kernel, which then leaves
    parameters and state untouched and subtracts ``found_inf`` from the step counters.
    """
    raw = getattr(optimizer, "optimizer", optimizer)
    return (
        isinstance(raw, torch.optim.Optimizer)
        and bool(getattr(raw, "_step_supports_amp_scaling", False))
        and all(g.get("fused") for g in raw.param_groups)
    )


def arm_fused_skip(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> torch.Tensor:
    """Make the next fused step of ``optimizer`` a no-op when the 0-d device ``flag`` is true.

    Sets the ``found_inf`` attribute torch's fused step reads (the protocol GradScaler uses; torch has
    no public API for it). Returns the float flag set, for :func:`disarm_fused_skip`.
    """
    raw = getattr(optimizer, "optimizer", optimizer)
    found_inf = flag.float().reshape(())
    raw.found_inf = found_inf
    return found_inf


def disarm_fused_skip(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Remove the flag :func:`arm_fused_skip` set, unless something replaced it since."""
    raw = getattr(optimizer, "optimizer", optimizer)
    if raw.__dict__.get("found_inf") is found_inf:
        del raw.found_inf


def ensure_unscaled(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Unscale gradients of a fused optimizer under a GradScaler before we read them.

    Lightning's ``16-mixed`` plugin does not unscale optimizers that unscale inside their fused
    step, so in ``on_before_optimizer_step`` their gradients are still scaled. ``scaler.unscale_``
    is public and sync-free; afterwards ``scaler.step`` passes ``grad_scale=None`` and its
    ``found_inf``, so nothing is unscaled twice. The stage check reads GradScaler's private
    per-optimizer state because calling ``unscale_`` twice raises.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    raw = getattr(optimizer, "optimizer", optimizer)
    if scaler is None or not scaler.is_enabled() or not getattr(raw, "_step_supports_amp_scaling", False):
        return
    state = scaler._per_optimizer_states[id(raw)]
    if state["stage"].name == "READY":
        scaler.unscale_(raw)


def active_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The precision plugin's enabled GradScaler (``16-mixed`` on GPU), else None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def mark_scaler_skip(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                     flag: torch.Tensor) -> None:
    """Make ``scaler.step`` skip this optimizer's step when the 0-d device ``flag`` is true.

    After ``unscale_`` the scaler decides from its recorded per-device ``found_inf`` tensors, so we
    add the flag to them (on device, no sync). GradScaler exposes no public hook for this, hence the
    private ``_per_optimizer_states``. As for any inf step, the scale is then backed off once.
    """
    raw = getattr(optimizer, "optimizer", optimizer)
    found = scaler._per_optimizer_states[id(raw)]["found_inf_per_device"]
    for device, t in found.items():
        torch.maximum(t, flag.to(device, t.dtype), out=t)
