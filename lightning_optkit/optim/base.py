"""The base class for kit optimizers: declare hyperparameters, state and one update rule.

A subclass writes three things:

* ``validators``: a mapping from hyperparameter name to a check (see :func:`non_negative`,
  :func:`beta`, :func:`betas`), run on the defaults and on every param group at construction;
* ``state_names`` (per-parameter state tensors, created by :meth:`KitOptimizer._init_state`) and
  ``counts_steps`` (whether a per-parameter ``state["step"]`` counter is kept);
* ``_update(group, params, grads, state, steps)``: the update rule over lists of tensors of one
  device and dtype, written with ``torch._foreach_*`` ops.

The step is :class:`~lightning_optkit.optim.core.StepOptimizer`'s (closure, gathered gradients, the
pending :class:`~lightning_optkit.optim.modifiers.StepModifiers`); this base supplies its per-group update,
:meth:`KitOptimizer.update_group`: the rule runs either once per (device, dtype) bucket (``foreach=True``,
the default) or once per parameter (``foreach=False``, the rule sees one-element lists). ``zero_grad``,
``state_dict`` and ``load_state_dict`` are torch's, so checkpoints have torch's format. Step counters and
other scalar state are 0-d tensors on the parameter's device (so a skipped step never needs a host sync),
float32, or float64 for float64 parameters: a float64 run computes its bias corrections, warmup and lr
scalars in float64 throughout.

Step modifiers on the foreach / per-parameter path, exactly: a deferred grad scale multiplies ``p.grad``
in place (one extra read+write of the gradients, no extra allocation; ``p.grad`` holds the scaled
gradient afterwards, as after torch's clipping). A deferred skip flag advances step counters by
``not skip``, snapshots every other tensor the rule writes (parameters and state: one foreach clone, so
temporarily one extra copy of them), runs the rule, then selects old or new values on device
(:func:`restore_if`): bit-identical on skip and no host sync, but an extra pass over parameters and
state. NonFiniteGuard defers a skip flag on every step, so for guarded runs ``fused=True`` (where the
optimizer has a kernel) is the fast path: the kernel applies scale and skip inside its single pass.

Blocked rules (``blocked = True``: Adan, ScheduleFreeAdamW, LAMB, Lion): ``_update`` computes its per-tensor
scalars once, then iterates :meth:`KitOptimizer._blocks`, which cuts the bucket into cache-sized pieces on CPU
(:mod:`lightning_optkit.optim.blocks`; whole lists elsewhere) and applies the modifiers per block: the grad scale
multiplies the block's gradients in place just before the rule reads them (cache-hot), and the skip snapshot and
select cover only that block's written pieces, in persistent block-sized buffers. Every element goes through
the same operations as in the whole-list rule, so the bits are the same (LAMB: the norms of cut tensors are
summed from their pieces). Temporaries of one-piece blocks come from persistent buffers (``Scratch``).

Fused path: a subclass that sets ``fused_step = staticmethod(<kernel function>)`` (a direct reference, e.g.
:func:`lightning_optkit.kernels.hooks.lion_fused_step`) accepts ``fused=True``; then each group goes to that
function with ``(group, params, grads, state_lists, scale, skip)``, as torch's ``adam()`` hands the same
arguments to its fused, foreach or single-tensor function. The kernel owns the whole update there:
incrementing ``state_lists["step"]`` (when the optimizer counts steps), multiplying gradients by
``scale`` and leaving everything untouched when ``skip`` is true. ``fused_step = None`` (the default, or
a class whose kernel this installation lacks) makes ``fused=True`` raise NotImplementedError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_optkit import validation
from lightning_optkit.errors import SpecError
from lightning_optkit.norms import tensor_norms
from lightning_optkit.optim.blocks import Scratch, split_blocks
from lightning_optkit.optim.core import StepOptimizer
from lightning_optkit.sharding import any_sharded, local_tensors

Validator = Callable[[str, Any], None]
#: A fused step: ``(group, params, grads, state_lists, scale, skip) -> None`` (see the module docstring).
FusedStep = Callable[[dict[str, Any], list[Tensor], list[Tensor], dict[str, list[Tensor]], Tensor | None,
                      Tensor | None], None]


def non_negative(name: str, value: Any) -> None:
    """Check that ``value`` is a finite number >= 0 (learning rates, eps, weight decay)."""
    validation.number(name, value, non_negative=True, strings=False)


def beta(name: str, value: Any) -> None:
    """Check that ``value`` is a number in [0, 1) (an EMA coefficient)."""
    validation.number(name, value, non_negative=True, below_one=True, strings=False,
                      fix=f"pass {name} in [0, 1), e.g. 0.9")


def betas(count: int) -> Validator:
    """A check that ``value`` is a tuple of ``count`` numbers, each in [0, 1)."""

    def check(name: str, value: Any) -> None:
        validation.numbers(name, value, count, non_negative=True, below_one=True, strings=False)

    return check


def flag(name: str, value: Any) -> None:
    """Check that ``value`` is True, False or None."""
    validation.flag(name, value, allow_none=True)


class KitOptimizer(StepOptimizer):
    """A torch optimizer defined by its hyperparameter checks, its state and one update rule.

    Subclasses call ``super().__init__(params, **hyperparameters)`` from an ``__init__`` with explicit
    keywords, and implement :meth:`_update`. Every group also takes ``foreach`` (None = True).
    """

    validators: ClassVar[dict[str, Validator]] = {}
    state_names: ClassVar[tuple[str, ...]] = ()
    scalar_state_names: ClassVar[tuple[str, ...]] = ()
    counts_steps: ClassVar[bool] = True
    #: The fused kernel (a staticmethod), or None: no ``fused=True`` (see the module docstring).
    fused_step: ClassVar[FusedStep | None] = None
    #: True: ``_update`` iterates :meth:`_blocks` (cache-sized pieces; scale and skip applied per block)
    blocked: ClassVar[bool] = False
    block_numel: ClassVar[int | None] = None  # None: BLOCK_NUMEL per intra-op thread (blocks.block_numel_for)
    _block_modifiers: tuple[Tensor | None, Tensor | None, bool] = (None, None, False)  # scale, skip, per_tensor

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **defaults: Any) -> None:
        defaults.setdefault("foreach", None)
        if self.fused_step is not None:
            defaults.setdefault("fused", None)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------- groups
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check the group's hyperparameters (``validators``), ``foreach``/``fused`` and refuse complex params."""
        name = type(self).__name__
        for key, check in self.validators.items():
            check(key, group[key])
        flag("foreach", group["foreach"])
        for i, p in enumerate(group["params"]):
            if torch.is_complex(p):
                raise SpecError("params", f"parameter {i} of dtype {p.dtype}",
                                f"{name} has no complex support: optimize torch.view_as_real(p) as a real "
                                "parameter instead", problem="is a complex parameter")
        if "fused" in group:
            flag("fused", group["fused"])
            if group["fused"] and self.fused_step is None:
                raise NotImplementedError(
                    f"{name}(fused=True) needs a fused kernel from lightning_optkit.kernels, which this "
                    "installation does not provide; use fused=None (the foreach path) instead"
                )

    # ------------------------------------------------------------------------------------------ state
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Fresh per-parameter state: zeros like ``p`` for each of ``state_names``."""
        return {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name in self.state_names}

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """:meth:`_init_state`, then a 0-d ``step`` counter when the optimizer counts steps."""
        state = self._init_state(p, group)
        if self.counts_steps:
            state["step"] = torch.zeros((), dtype=scalar_dtype(p), device=p.device)
        return state

    def _counter_names(self) -> tuple[str, ...]:
        return (("step",) if self.counts_steps else ()) + self.scalar_state_names

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``; afterwards step counters are on the parameter's device, in
        :func:`scalar_dtype` of the parameter."""
        super().load_state_dict(state_dict)
        counters = self._counter_names()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                for name in counters if state else ():
                    if name in state:
                        state[name] = state[name].to(device=p.device, dtype=scalar_dtype(p))

    # ------------------------------------------------------------------------------------------- step
    def update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], *,
                     grad_scale: Tensor | None = None, skip: Tensor | None = None) -> None:
        """The rule over ``params`` of ``group`` (see :meth:`StepOptimizer.update_group`): the fused kernel
        (``fused=True``), once per parameter (``foreach=False``) or once per (device, dtype) bucket."""
        for p in params:
            self._state_of(p, group)
        if self.fused_step is not None and group.get("fused"):
            self._fused_update(group, params, grads, grad_scale, skip)
        elif group["foreach"] is False:
            for p, g in zip(params, grads):
                self._run_rule(group, [p], [g], grad_scale, skip)
        else:
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
            for p, g in zip(params, grads):
                bucket = buckets.setdefault((p.device, p.dtype), ([], []))
                bucket[0].append(p)
                bucket[1].append(g)
            for bucket_params, bucket_grads in buckets.values():
                self._run_rule(group, bucket_params, bucket_grads, grad_scale, skip)

    def _state_lists(self, params: list[Tensor]) -> dict[str, list[Tensor]]:
        names = self.state_names + self._counter_names()
        return {name: [self.state[p][name] for p in params] for name in names}

    def _run_rule(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        scale: Tensor | None, skip: Tensor | None,
    ) -> None:
        lists = self._state_lists(params)
        steps = lists.pop("step", [])
        self._bucket_params = params
        if any_sharded(params):
            # FSDP2: the rule runs on each rank's shards (state is sharded like its parameter);
            # whole_tensor_norms gives a rule that needs them the norms of the whole tensors
            params, grads = list(local_tensors(params)), list(local_tensors(grads))
            lists = {name: list(local_tensors(ts)) for name, ts in lists.items()}
        if self.blocked:
            self._run_blocked(group, params, grads, lists, steps, scale, skip)
            return
        if skip is not None:
            # Snapshot everything the rule writes (one foreach clone), update, then select old or new on
            # device: no host sync, and the old values come back bit for bit (NaN and -0.0 included).
            touched = [*params, *(t for ts in lists.values() for t in ts)]
            saved = torch._foreach_clone(touched)
        if scale is not None:
            # In place on p.grad (as GradientClipping does for other optimizers): no gradient-sized copy.
            torch._foreach_mul_(grads, scale.to(grads[0].device))
        _advance(steps, skip)
        self._update(group, params, grads, lists, steps)
        if skip is not None:
            restore_if(skip.to(params[0].device), touched, saved)

    def _run_blocked(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], lists: dict[str, list[Tensor]],
        steps: list[Tensor], scale: Tensor | None, skip: Tensor | None,
    ) -> None:
        """The step of a ``blocked`` rule: :meth:`_blocks` applies scale and skip block by block; here only
        the 0-d scalar state is snapshotted (one clone of a few scalars) and the counters advanced."""
        device = params[0].device
        skip = None if skip is None else skip.to(device)
        scalars = [t for name in self.scalar_state_names for t in lists[name]]
        saved = torch._foreach_clone(scalars) if skip is not None and scalars else None
        _advance(steps, skip)
        per_tensor = device.type == "cpu"  # restore_if's choice, made once per step
        self._block_modifiers = (None if scale is None else scale.to(device), skip, per_tensor)
        try:
            self._update(group, params, grads, lists, steps)
        finally:
            self._block_modifiers = (None, None, False)
        if saved is not None:
            restore_if(skip, scalars, saved, per_tensor=per_tensor)

    def _blocks(
        self, lists: dict[str, list[Tensor]], writes: tuple[str, ...], *, scale_grads: bool = True,
        split: bool = True,
    ) -> Iterator[tuple[list[int], dict[str, list[Tensor]]]]:
        """Cache-sized blocks of the aligned ``lists`` (see :mod:`lightning_optkit.optim.blocks`) for a
        ``blocked`` rule to update one after the other.

        Yields ``(owners, views)``: ``views[name]`` are pieces of ``lists[name]``, ``owners`` the bucket index
        of each piece (for :func:`~lightning_optkit.optim.blocks.pick`). With a pending grad scale the
        ``"grad"`` pieces are multiplied in place first (``scale_grads``: the first pass over the grads
        only); with a pending skip flag the pieces of ``writes`` are snapshotted before the block is
        updated and selected back after it (bit for bit, no host sync), so a guarded step touches main
        memory no more than a plain one. ``split=False`` keeps the lists whole (one block).
        """
        scale, skip, per_tensor = self._block_modifiers
        names = list(lists)
        columns = [lists[name] for name in names]
        blocks = split_blocks(columns, self.block_numel) if split else [(list(range(len(columns[0]))), columns)]
        if not writes:
            skip = None  # the rule applies the skip flag itself
        for owners, views in blocks:
            block = dict(zip(names, views))
            if scale is not None and scale_grads:
                torch._foreach_mul_(block["grad"], scale.to(block["grad"][0].dtype))
            if skip is not None:
                written = [t for name in writes for t in block[name]]
                rows = self._scratch("_snapshot_scratch").take(block[writes[0]], len(writes))
                one_piece = rows[0] is not None
                if one_piece:  # into persistent buffers (no fresh mapping per block)
                    saved = rows
                    torch._foreach_copy_(saved, written)
                else:
                    saved = torch._foreach_clone(written)
            yield owners, block
            if skip is not None:
                # one piece per list: the three integer foreach ops (about 30 us each per 128K fp32 elements on
                # this project's CPU, against 165 us for one where with a 0-d condition); else restore_if's choice
                restore_if(skip, written, saved, per_tensor=False if one_piece else per_tensor)

    def _scratch(self, name: str = "_rule_scratch") -> Scratch:
        """Persistent block-sized buffers (not optimizer state: no checkpoint carries them)."""
        scratch = self.__dict__.get(name)
        if scratch is None:
            scratch = Scratch(self.block_numel)
            setattr(self, name, scratch)
        return scratch

    def _temporaries(self, block: dict[str, list[Tensor]], count: int) -> list[Tensor | None]:
        """``count`` temporaries for a rule on ``block`` (see :func:`~lightning_optkit.optim.blocks.fresh`)."""
        return self._scratch().take(block["param"], count)

    def scratch_nbytes(self) -> int:
        """Bytes of persistent scratch this optimizer holds besides its state (block buffers)."""
        return sum(self._scratch(name).nbytes() for name in ("_rule_scratch", "_snapshot_scratch"))

    def whole_tensor_norms(self, tensors: list[Tensor]) -> list[Tensor]:
        """2-norms of per-parameter tensors of the bucket :meth:`_update` is updating, in order.

        ``tensors`` is one or more per-parameter lists of the bucket, concatenated (the parameters,
        their gradients, an update computed from them): ``tensors[i]`` belongs to parameter
        ``i % len(bucket)``. Unsharded: ``torch._foreach_norm``. Under FSDP2, where ``_update`` sees
        local shards, the norms of the whole tensors (one all-reduce, the same on every rank): what a
        rule such as LAMB's trust ratio needs.
        """
        bucket = list(getattr(self, "_bucket_params", ()))  # set by _run_rule for the bucket being updated
        if not any_sharded(bucket):
            return list(torch._foreach_norm(tensors))
        if len(tensors) % len(bucket):
            raise ValueError(f"whole_tensor_norms got {len(tensors)} tensors for a bucket of {len(bucket)} "
                             "parameters; pass whole per-parameter lists")
        return tensor_norms(tensors, 2.0, shards_of=bucket * (len(tensors) // len(bucket)))

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        state: dict[str, list[Tensor]], steps: list[Tensor],
    ) -> None:
        """Apply the update rule in place to ``params`` and ``state`` (one device and dtype).

        ``grads`` already include the pending grad scale and must not be written. ``steps`` hold
        the per-parameter step counts after this step (1 on the first step); empty when the
        optimizer does not count steps.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _update")

    def _fused_update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        scale: Tensor | None, skip: Tensor | None,
    ) -> None:
        """Hand the group to :attr:`fused_step` (see the module docstring); FSDP2 shards go as local tensors."""
        state_lists = self._state_lists(params)
        if any_sharded(params):  # FSDP2: element-wise kernels on each rank's shards
            params, grads = list(local_tensors(params)), list(local_tensors(grads))
            state_lists = {name: list(local_tensors(ts)) for name, ts in state_lists.items()}
        kernel = self.fused_step
        if kernel is None:
            raise NotImplementedError(f"{type(self).__name__} has no fused kernel; use fused=None")
        kernel(group, params, grads, state_lists, scale, skip)


def _advance(steps: list[Tensor], skip: Tensor | None) -> None:
    """Counters advance by 0 or 1 on device (exact for these small integers): no snapshot needed. On a
    skipped step the rule sees the old count; its results are discarded by the select."""
    if steps and skip is not None:
        torch._foreach_add_(steps, (~skip).to(device=steps[0].device, dtype=steps[0].dtype))
    elif steps:
        torch._foreach_add_(steps, 1.0)


def scalar_dtype(p: Tensor) -> torch.dtype:
    """The dtype of a parameter's scalar state (step counters, running sums): float64 for float64
    parameters, float32 otherwise (exact step counts up to 2**24, ample for bias corrections)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def restore_if(flag: Tensor, tensors: list[Tensor], saved: list[Tensor], *, per_tensor: bool | None = None) -> None:
    """``tensors[i] <- saved[i]`` where the 0-d bool ``flag`` is true, bit for bit, with no host sync.

    ``per_tensor`` (default: on CPU) runs one ``torch.where`` per tensor: on CPU a foreach op is a loop
    of per-tensor ops anyway, and this is the fewest of them. Elsewhere a launch per tensor would cost
    more than the update, so the select runs as three multi-tensor ops on the integer bit patterns:
    ``new + (old - new) * flag``, exact in two's complement wrap-around (NaN payloads and -0.0 included).
    """
    if not tensors:
        return
    if per_tensor if per_tensor is not None else tensors[0].device.type == "cpu":
        for tensor, old in zip(tensors, saved):
            torch.where(flag, old, tensor, out=tensor)
        return
    by_size: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
    for tensor, old in zip(tensors, saved):
        bits = _BITS[tensor.element_size()]
        news, olds = by_size.setdefault(tensor.element_size(), ([], []))
        news.append(tensor.view(bits))
        olds.append(old.view(bits))
    for size, (news, olds) in by_size.items():
        torch._foreach_sub_(olds, news)  # the snapshots are scratch now: old - new
        torch._foreach_mul_(olds, flag.to(_BITS[size]))
        torch._foreach_add_(news, olds)


def bias_correction(steps: list[Tensor], coefficient: float) -> Tensor:
    """``1 - coefficient ** step`` for each counter, stacked, computed as ``-expm1(step * log c)``.

    The expm1 form keeps full relative precision where ``1 - c**t`` is tiny (c = 0.999); the result
    has the counters' dtype (float64 for float64 parameters).
    """
    log_c = math.log(coefficient) if coefficient > 0 else -math.inf
    return torch.special.expm1(torch.stack(steps) * log_c).neg_()
