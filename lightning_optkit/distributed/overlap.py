"""DDP with the optimizer step overlapped with backward: a comm hook that updates each bucket once reduced.

:func:`overlap_hook` is a DDP communication hook. It all-reduces (averages) one gradient bucket and,
when that future completes, applies the AdamW update to that bucket's parameters: one multi-tensor
launch per (bucket, param group), through ``FusedAdamW.update_group`` (the step's own update). Buckets are
reduced while backward still runs for earlier layers, so the update of the last layers overlaps with
the backward of the first ones instead of waiting for the whole backward to finish.

:class:`OverlapDDPStrategy` wires it into Lightning: it is a ``DDPStrategy`` built with
``ddp_comm_hook=overlap_hook, ddp_comm_state=OverlapState(...)``; it registers the hook on every
device (Lightning itself registers comm hooks on CUDA only), hands the optimizer to the hook after
``configure_optimizers``, and turns Lightning's optimizer step into a no-op stepper: the step still
runs the closure (forward, backward, ``on_before_optimizer_step``) and the optimizer keeps its state,
``state_dict`` and param groups, so schedules, checkpoints and resume work unchanged; only the
parameter update has already happened, inside backward.

Supported: one :class:`~lightning_optkit.optim.fused_adamw.FusedAdamW` optimizer holding every trainable
parameter (any param groups, amsgrad, maximize, ``stochastic_rounding``); automatic optimization; gradient accumulation
(``accumulate_grad_batches``: micro-batches run under ``no_sync`` and never update); lr schedules
(each bucket reads its group's ``lr`` when it updates, a float or a device tensor); checkpointing and
resume (the state is the optimizer's own); clipping and non-finite skipping *per bucket or per
parameter* inside the hook (``max_norm``, ``clip_per``, ``skip_non_finite``).

Not supported (each raises a :class:`~lightning_optkit.errors.SpecError` at setup, naming the way
out): global-norm clipping (``GradientClipping``, ``Trainer(gradient_clip_val)``, ``FusedAdamW(
max_grad_norm)``) and a global skip decision (``NonFiniteGuard``), because both need every bucket's
gradient before any parameter may change; ``OptimizerMonitor`` parameter/update norms (they would be
read after the update); manual optimization; several optimizers; other optimizer classes;
``find_unused_parameters=True``; fp16 with a GradScaler (its inf check needs all gradients).
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from lightning_optkit.errors import SpecError
from lightning_optkit.norms import clip_coefficient
from lightning_optkit.unwrap import raw_optimizer
from lightning_optkit.validation import flag, number

__all__ = ["OverlapDDPStrategy", "OverlapState", "overlap_hook"]

_CLIP_PER = ("bucket", "param")


class OverlapState:
    """The ``ddp_comm_state`` of :func:`overlap_hook`: the optimizer it updates and its per-bucket options.

    Args:
        max_norm: clip inside the hook (``None``: no clipping): each bucket's gradient norm
            (``clip_per="bucket"``) or each parameter's (``clip_per="param"``) is scaled down to at
            most ``max_norm``, with :func:`lightning_optkit.norms.clip_coefficient`: ``clip_grad_norm_``'s
            ``min(1, max_norm / (norm + 1e-6))``, but NaN for a non-finite norm (so the update is visibly
            broken rather than zeroed when ``skip_non_finite=False``).
        clip_per: ``"bucket"`` or ``"param"``.
        skip_non_finite: leave a bucket's parameters and state untouched when its reduced gradient
            holds NaN/inf. Reduced gradients are the same on every rank, so every rank decides the same.
        process_group: the group to all-reduce over (``None``: the default group).

    ``bucket_updates`` counts applied bucket updates (host int); ``last_bucket_norms`` maps bucket index
    to its latest gradient norm (0-d device tensor), set when clipping or skipping computes it.
    """

    def __init__(self, *, max_norm: float | None = None, clip_per: str = "bucket", skip_non_finite: bool = True,
                 process_group: Any = None) -> None:
        max_norm = number("max_norm", max_norm, positive=True, allow_none=True, strings=False,
                          fix="pass a positive number, or None to not clip")
        if clip_per not in _CLIP_PER:
            raise SpecError("clip_per", clip_per, f"use one of {list(_CLIP_PER)}", problem="is not a clipping unit")
        self.skip_non_finite = flag("skip_non_finite", skip_non_finite)
        self.max_norm = max_norm
        self.clip_per = clip_per
        self.process_group = process_group
        self.optimizer: Any = None
        self.armed = False  # True while Lightning runs the closure of an optimizer step
        self.bucket_updates = 0
        self.last_bucket_norms: dict[int, torch.Tensor] = {}
        self._group_of: dict[int, int] = {}

    def attach(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> None:
        """Let the hook update ``module``'s parameters with ``optimizer`` (a FusedAdamW holding all of them)."""
        from lightning_optkit.optim.fused_adamw import FusedAdamW

        raw = raw_optimizer(optimizer)
        if not isinstance(raw, FusedAdamW):
            raise SpecError("optimizer", type(raw).__name__, "use optimizer='fused_adamw' (FusedAdamW) in the "
                            "spec, or train without overlap (strategy='ddp')",
                            problem="cannot be applied per bucket by the overlap hook")
        if raw.max_grad_norm is not None:
            raise SpecError("max_grad_norm", raw.max_grad_norm, "drop FusedAdamW(max_grad_norm); clip per bucket "
                            "or per parameter with OverlapDDPStrategy(max_norm=..., clip_per='bucket'|'param'), "
                            "or train without overlap", problem="is a global-norm clip, which per-bucket updates "
                            "cannot apply")
        self._group_of = {id(p): i for i, g in enumerate(raw.param_groups) for p in g["params"]}
        missing = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in self._group_of]
        if missing:
            raise SpecError("optimizer params", missing[:3], "give the overlapped optimizer every trainable "
                            "parameter, or freeze the others (requires_grad=False)",
                            problem="are trainable but not in the optimizer")
        self.optimizer = raw

    # ----------------------------------------------------------------------------------- the update
    def _modifiers(self, index: int, grads: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(grad scale, skip flag) for one bucket; per-parameter clipping is applied to ``grads`` here."""
        if self.max_norm is None and not self.skip_non_finite:
            return None, None
        norms = torch._foreach_norm(grads, 2.0)  # private torch op: the only multi-tensor norm there is
        bucket_norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
        self.last_bucket_norms[index] = bucket_norm
        skip = ~torch.isfinite(bucket_norm) if self.skip_non_finite else None
        scale = None
        if self.max_norm is not None and self.clip_per == "bucket":
            scale = clip_coefficient(self.max_norm, bucket_norm)
        elif self.max_norm is not None:
            coefs = [clip_coefficient(self.max_norm, n.float()).to(g.dtype) for n, g in zip(norms, grads)]
            torch._foreach_mul_(grads, coefs)
        return scale, skip

    @torch.no_grad()
    def update_bucket(self, bucket: dist.GradBucket) -> None:
        """Apply the AdamW update to the bucket's parameters from its (already averaged) gradients."""
        opt = self.optimizer
        if opt is None:
            raise RuntimeError("overlap_hook has no optimizer: use lightning_optkit.distributed.OverlapDDPStrategy, "
                               "which attaches it and stops Lightning from stepping a second time")
        params = bucket.parameters()
        grads = bucket.gradients()  # views of the reduced bucket buffer
        scale, skip = self._modifiers(bucket.index(), grads)
        by_group: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for p, g in zip(params, grads):
            index = self._group_of.get(id(p))
            if index is None:
                raise RuntimeError("a DDP parameter is not in the overlapped optimizer (was a param group added "
                                   "after setup?); the overlap hook cannot update it")
            ps, gs = by_group.setdefault(index, ([], []))
            ps.append(p)
            gs.append(g)
        for index, (ps, gs) in by_group.items():
            # FusedAdamW's own per-group update (the same state layout, fused or lean, its step uses).
            opt.update_group(opt.param_groups[index], ps, gs, grad_scale=scale, skip=skip)
        self.bucket_updates += 1

    def finish_step(self) -> None:
        """Close one optimizer step: ``FusedAdamW.finish_step`` (advances its stochastic-rounding seeds), once.

        Every bucket of a step uses the same seed, as FusedAdamW's own step uses one seed for all its
        groups. :class:`OverlapDDPStrategy` calls this after each step; call it yourself after each armed
        backward when you register :func:`overlap_hook` by hand.
        """
        if self.optimizer is not None:
            self.optimizer.finish_step()


def overlap_hook(state: OverlapState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the bucket over ranks, then (during an optimizer step) update its parameters.

    (No ``from __future__ import annotations`` in this module: DDP checks these annotations at runtime.)

    Outside an optimizer step (``state.armed`` false) it is a plain averaging all-reduce.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(group))
    future = dist.all_reduce(buffer, group=group, async_op=True).get_future()

    def then_update(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced = fut.value()[0]
        if state.armed:
            state.update_bucket(bucket)
        return reduced

    return future.then(then_update)


class _StepAppliedByHook:
    """Stands in for the overlapped optimizer in Lightning's step: runs the closure, updates nothing.

    Everything else (param groups, state, ``zero_grad``) is the real optimizer's, reached through
    ``optimizer`` or attribute forwarding, so callbacks and schedules see the real thing.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure (forward and backward: the hook updates the parameters during backward)."""
        loss = closure() if closure is not None else None
        scale, skip = self.optimizer.pop_step_modifiers()
        if scale is not None or skip is not None:
            raise SpecError("callbacks", "a callback calling defer_grad_scale/defer_skip", "remove it, or train "
                            "without overlap (strategy='ddp')", problem="acts after the overlap hook has "
                            "already updated the parameters, so its scale or skip would be ignored")
        return loss


def _overlap_conflicts(trainer: Any) -> None:
    """Raise for settings that need every gradient before any update (see the module docstring)."""
    from lightning_optkit.callbacks.clipping import GradientClipping
    from lightning_optkit.callbacks.guard import NonFiniteGuard
    from lightning_optkit.callbacks.monitor import OptimizerMonitor

    alternatives = ("clip per parameter or per bucket inside the hook with OverlapDDPStrategy(max_norm=..., "
                    "clip_per='param' or 'bucket'), or train without overlap (strategy='ddp')")
    module = trainer.lightning_module
    if not module.automatic_optimization:
        raise SpecError("automatic_optimization", False, "use automatic optimization (one optimizer), or train "
                        "without overlap (strategy='ddp')", problem="is not supported by the overlap hook: the "
                        "backward of a manual step runs before Lightning knows a step follows")
    if trainer.gradient_clip_val:
        raise SpecError("Trainer(gradient_clip_val)", trainer.gradient_clip_val, alternatives,
                        problem="is global-norm clipping, which needs every bucket before the first update")
    for cb in trainer.callbacks:
        if isinstance(cb, GradientClipping):
            raise SpecError("callbacks", f"GradientClipping(algorithm={cb.algorithm!r}, per={cb.per!r})",
                            alternatives, problem="clips after backward, when the overlap hook has already "
                            "updated the parameters")
        if isinstance(cb, NonFiniteGuard):
            raise SpecError("callbacks", "NonFiniteGuard", "use OverlapDDPStrategy(skip_non_finite=True) (a skip "
                            "decision per bucket, inside the hook), or train without overlap (strategy='ddp')",
                            problem="decides the skip after backward, when the parameters are already updated")
        if isinstance(cb, OptimizerMonitor) and set(cb.norms) & {"param", "update"}:
            raise SpecError("OptimizerMonitor(norms)", cb.norms, "use OptimizerMonitor(norms=('grad',)) with "
                            "overlap, or train without overlap", problem="would read parameters after the "
                            "overlap hook updated them (pre-step norms and update norms would be wrong)")
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        raise SpecError("Trainer(precision)", trainer.precision, "use precision='bf16-mixed' or '32-true' with "
                        "overlap", problem="uses a GradScaler, whose inf check needs every gradient first")


class OverlapDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with :func:`overlap_hook`: the optimizer step runs per bucket, in backward.

    ``Trainer(strategy=OverlapDDPStrategy(), devices=..., num_nodes=...)``. Keyword arguments
    ``max_norm``, ``clip_per`` and ``skip_non_finite`` go to :class:`OverlapState`; the others to
    ``DDPStrategy`` (and from there to ``DistributedDataParallel``, e.g. ``bucket_cap_mb``). See the
    module docstring for what is and is not supported. ``overlap`` is the hook's state.
    """

    def __init__(self, *, max_norm: float | None = None, clip_per: str = "bucket", skip_non_finite: bool = True,
                 **ddp_kwargs: Any) -> None:
        for key in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period"):
            if key in ddp_kwargs:
                raise SpecError(key, ddp_kwargs[key], "drop it: OverlapDDPStrategy installs its own comm hook",
                                problem="conflicts with the overlap hook")
        if ddp_kwargs.get("find_unused_parameters"):
            raise SpecError("find_unused_parameters", True, "use find_unused_parameters=False with overlap, or "
                            "train without overlap", problem="would make the hook update unused parameters "
                            "with zero gradients")
        self.overlap = OverlapState(max_norm=max_norm, clip_per=clip_per, skip_non_finite=skip_non_finite)
        super().__init__(ddp_comm_hook=overlap_hook, ddp_comm_state=self.overlap, **ddp_kwargs)

    def setup_environment(self) -> None:
        """Refuse incompatible settings before any process group is created, then set up as DDP does."""
        _overlap_conflicts(self.lightning_module.trainer)
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        """Wrap the model (the hook is registered), then hand the optimizer to the hook."""
        super().setup(trainer)
        if len(self.optimizers) != 1:
            raise SpecError("optimizers", len(self.optimizers), "configure exactly one optimizer (FusedAdamW) "
                            "with overlap, or train without overlap", problem="is not one")
        self.overlap.attach(self.optimizers[0], self.lightning_module)

    def configure_ddp(self) -> None:
        """Wrap the model in DDP and register the overlap hook on any device, not only CUDA.

        Lightning's ``DDPStrategy`` registers ``ddp_comm_hook`` only when the root device is CUDA; DDP
        comm hooks work with gloo on CPU too, so for other devices it is registered here, with DDP's
        public ``register_comm_hook``.
        """
        super().configure_ddp()
        if self.root_device.type != "cuda":
            self.model.register_comm_hook(state=self.overlap, hook=overlap_hook)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        """Run the step's closure with the hook armed; the optimizer itself does not update again."""
        raw = raw_optimizer(optimizer)
        if self.overlap.optimizer is None or raw is not self.overlap.optimizer:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        self.overlap.armed = True
        try:
            result = super().optimizer_step(_StepAppliedByHook(raw), closure, model, **kwargs)
        finally:
            self.overlap.armed = False
        self.overlap.finish_step()
        return result
