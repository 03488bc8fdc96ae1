"""GradientClipping: norm, value, AGC and adaptive (z-score, quantile) clipping as a Lightning Callback."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

from lightning_optkit.callbacks._adaptive import NormHistory, RunningNormStats
from lightning_optkit.callbacks._step_metrics import (
    BatchSteps,
    join_rows,
    publish_step_metrics,
    record_step_metrics,
    stop_joining_rows,
)
from lightning_optkit.callbacks.amp import ensure_unscaled
from lightning_optkit.callbacks.base import LeanCallback
from lightning_optkit.callbacks.sharded_checks import check_sharded_layout, refuse_sharded_strategy
from lightning_optkit.callbacks.stages import GradientRole, order_gradient_stages
from lightning_optkit.callbacks.step_norms import StepView, step_view
from lightning_optkit.errors import SpecError, closest
from lightning_optkit.norms import CLIP_EPS as _EPS
from lightning_optkit.norms import check_norm_type, clip_coefficient, combine_norms, tensor_norms
from lightning_optkit.param_names import named_parameters, param_names
from lightning_optkit.probe import sparse_grad_ids
from lightning_optkit.sharding import any_sharded, local_tensors, shard_dims
from lightning_optkit.validation import number

# clip_coefficient lives in lightning_optkit.norms; re-exported here for existing imports
__all__ = ["GradientClipping", "CLIP_ALGORITHMS", "clip_coefficient"]

#: The extra keyword arguments each algorithm accepts, with their defaults.
CLIP_ALGORITHMS: dict[str, dict[str, Any]] = {
    "norm": {},
    "value": {},
    "agc": {"clip_factor": 0.01, "eps": 1e-3},
    "zscore": {"z_thresh": 2.5, "alpha": 0.97, "warmup_steps": 25},
    "quantile": {"quantile": 0.9, "history": 1000, "warmup_steps": 25},
}
_PER = ("global", "group", "param")


def _mul_grads_(grads: Sequence[torch.Tensor], coefs: Sequence[torch.Tensor]) -> None:
    """``grads[i] *= coefs[i]`` with one foreach launch per (device, dtype) group (sharded: on the shards)."""
    grads = local_tensors(grads)
    groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
    for g, c in zip(grads, coefs, strict=True):
        gs, cs = groups.setdefault((g.device, g.dtype), ([], []))
        gs.append(g)
        cs.append(c.to(g.device, g.dtype))
    for gs, cs in groups.values():
        torch._foreach_mul_(gs, cs)


def _scale_grads_(grads: Sequence[torch.Tensor], coef: torch.Tensor) -> None:
    """``grads *= coef`` (a 0-d tensor) with one foreach launch per (device, dtype) group (sharded: on the
    shards)."""
    grads = local_tensors(grads)
    first = grads[0]
    if first.dtype == coef.dtype and all(g.dtype == coef.dtype for g in grads) and all(
            g.device == coef.device for g in grads):
        torch._foreach_mul_(grads, coef)  # the common case: one launch, nothing to convert
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), gs in groups.items():
        torch._foreach_mul_(gs, coef.to(device, dtype))


def _clamp_grads_(params: Sequence[torch.Tensor], max_value: float) -> None:
    """``clip_grad_value_``: torch's own for plain gradients, the same clamp on the shards of sharded ones and
    on the values of sparse ones (coalesced, so a row looked up twice is clamped after its parts are summed)."""
    sparse = [p for p in params if p.grad.is_sparse]
    if sparse:
        for p in sparse:
            if not p.grad.is_coalesced():
                p.grad = p.grad.coalesce()
            p.grad.values().clamp_(min=-max_value, max=max_value)
        params = [p for p in params if not p.grad.is_sparse]
        if not params:
            return
    grads = [p.grad for p in params]
    if not any_sharded(grads):
        torch.nn.utils.clip_grad_value_(params, max_value)
        return
    for g in local_tensors(grads):
        g.clamp_(min=-max_value, max=max_value)


def _unit_norms(x: torch.Tensor, norm_type: float) -> torch.Tensor:
    """AGC unit-wise norms: per output unit (row/filter) for ndim > 1, whole tensor otherwise.

    In the tensor's precision (float64 for float64 weights, as timm's AGC), float32 for bf16/fp16.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, norm_type)
    return torch.linalg.vector_norm(x, norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


class GradientClipping(LeanCallback):
    """Clip gradients once per optimizer step, after AMP unscaling and gradient accumulation.

    Acts in ``on_before_optimizer_step`` (automatic and manual optimization; in manual
    optimization each ``opt.step()`` clips that optimizer's own parameters). Do not combine with
    ``Trainer(gradient_clip_val=...)``: that raises at setup.

    Args:
        max_norm: The norm limit for ``algorithm="norm"`` (required there). For ``"zscore"`` and
            ``"quantile"`` an optional limit applied during their warmup.
        algorithm: ``"norm"`` (torch ``clip_grad_norm_``), ``"value"`` (``clip_grad_value_``),
            ``"agc"`` (adaptive gradient clipping, Brock et al. 2021: clip each output unit's
            gradient norm to ``clip_factor * max(unit weight norm, eps)``), ``"zscore"`` (clip the
            total norm to ``mean + z_thresh * std`` of an EMA of past norms, ZClip-style) or
            ``"quantile"`` (clip to a running ``quantile`` of the last ``history`` norms, AutoClip).
        norm_type: The p of the p-norms (``float("inf")`` allowed).
        max_value: The element-wise limit for ``algorithm="value"`` (required there, only there).
        per: For ``"norm"``: clip the ``"global"`` norm, each param ``"group"``'s norm, or each
            ``"param"``'s norm.
        exclude: Parameter-name patterns (``fnmatch``; ``"head"`` also matches ``"head.*"``) left
            unclipped and outside the norm, e.g. the classifier head for AGC. Each must match.
        **algorithm_kwargs: Per algorithm (defaults in :data:`CLIP_ALGORITHMS`): agc
            ``clip_factor=0.01, eps=1e-3``; zscore ``z_thresh=2.5, alpha=0.97, warmup_steps=25``;
            quantile ``quantile=0.9, history=1000, warmup_steps=25``. Others are rejected.

    Logged every logging step (``log_every_n_steps``), at the step of Lightning's own rows, to every
    logger (one row per batch with NonFiniteGuard's keys, one host transfer; not through
    ``pl_module.log``, which costs about 1 ms per call) and put in ``trainer.callback_metrics`` (so
    EarlyStopping or a plateau schedule can monitor them). ``<o>`` is empty with one optimizer and
    ``<label>/`` with several, where ``<label>`` is the optimizer's kit spec name, else its class
    name (repeats: ``Adam``, ``Adam-1``), the same label OptimizerMonitor and NonFiniteGuard use:

    ==================================  ===============================================================
    Key                                 Value
    ==================================  ===============================================================
    ``grad_clip/<o>total_norm``         total gradient norm before clipping (``exclude`` left out); not
                                        logged when OptimizerMonitor logs it as ``grad_norm/<o>total``
                                        (kept in ``trainer.callback_metrics``)
    ``grad_clip/<o>clip_coef``          coefficient applied; 1.0 when not clipped; for ``value``,
                                        ``agc``, per-group and per-param the ratio of post- to pre-clip
                                        total norm
    ``grad_clip/<o>threshold``          the adaptive limit (``zscore``, ``quantile`` only)
    ==================================  ===============================================================

    With several GradientClipping callbacks (they compose: each clips what the one before produced)
    each logs under ``grad_clip/<algorithm>/<o>...`` instead (repeats: ``norm``, ``norm-1``, in
    callback order), its ``total_norm`` being the norm it received.

    Attributes ``last_total_norm`` and ``last_clip_coef`` hold the latest values as 0-d device
    tensors (``last_clip_coef`` for ``value``/``agc`` is refreshed on logging steps only, as it
    needs an extra norm pass). A non-finite norm gives a NaN coefficient, never a finite one.

    Costs no host sync on non-logging steps. For kit optimizers implementing
    ``AcceptsStepModifiers`` a single global coefficient is handed over with
    ``defer_grad_scale``: the fused paths (FusedAdamW, ``fused=True``) apply it inside the update with no
    extra pass, the kit foreach path with one in-place multiply; otherwise ``torch._foreach_mul_``.
    The adaptive state (zscore/quantile) is saved in and restored from checkpoints.
    """

    #: Changes the gradients: runs after the monitor observes them and before the guard decides.
    gradient_role: ClassVar[GradientRole] = "modify"
    #: Read by OptimizerMonitor: with this one clipper, ``grad_clip/clip_coef`` is the coefficient, so the
    #: monitor does not log its own copy.
    logs_clip_coef = True

    def __init__(self, max_norm: float | None = None, *, algorithm: str = "norm", norm_type: float = 2.0,
                 max_value: float | None = None, per: str = "global", exclude: Sequence[str] = (),
                 **algorithm_kwargs: Any) -> None:
        if algorithm not in CLIP_ALGORITHMS:
            hint = closest(str(algorithm), CLIP_ALGORITHMS)
            fix = (f"did you mean {hint[0]!r}? " if hint else "") + f"use one of {sorted(CLIP_ALGORITHMS)}"
            raise SpecError("algorithm", algorithm, fix, problem="is not a clipping algorithm")
        try:
            self.norm_type = check_norm_type(norm_type)
        except (TypeError, ValueError):
            raise SpecError("norm_type", norm_type, "pass a positive p (e.g. 2.0) or float('inf')") from None
        if algorithm == "norm" and max_norm is None:
            raise SpecError("max_norm", None, "pass max_norm=<positive float> for algorithm='norm'",
                            problem="is required for algorithm='norm'")
        if algorithm in ("value", "agc") and max_norm is not None:
            raise SpecError("max_norm", max_norm, f"drop max_norm: algorithm={algorithm!r} does not use it"
                            + (" (set max_value)" if algorithm == "value" else " (set clip_factor)"),
                            problem=f"is not used by algorithm={algorithm!r}")
        max_norm = number("max_norm", max_norm, positive=True, allow_none=True, strings=False)
        if algorithm == "value":
            if max_value is None:
                raise SpecError("max_value", None, "pass max_value=<positive float> for algorithm='value'",
                                problem="is required for algorithm='value'")
            max_value = number("max_value", max_value, positive=True, strings=False)
        elif max_value is not None:
            raise SpecError("max_value", max_value, "drop max_value or use algorithm='value'",
                            problem=f"is not used by algorithm={algorithm!r}")
        if per not in _PER:
            raise SpecError("per", per, f"use one of {list(_PER)}")
        if per != "global" and algorithm != "norm":
            raise SpecError("per", per, "drop per= (only algorithm='norm' clips per group or per param)",
                            problem=f"is not used by algorithm={algorithm!r}")
        if isinstance(exclude, str):
            exclude = (exclude,)
        if not all(isinstance(p, str) and p for p in exclude):
            raise SpecError("exclude", exclude, "pass a sequence of parameter-name patterns, e.g. ('head',)")
        allowed = CLIP_ALGORITHMS[algorithm]
        unknown = sorted(set(algorithm_kwargs) - set(allowed))
        if unknown:
            hint = closest(unknown[0], allowed)
            fix = (f"did you mean {hint[0]!r}? " if hint else "") + (
                f"algorithm={algorithm!r} accepts {sorted(allowed)}" if allowed
                else f"algorithm={algorithm!r} takes no extra keyword arguments")
            raise SpecError(unknown[0], algorithm_kwargs[unknown[0]], fix,
                            problem=f"is not an argument of algorithm={algorithm!r}")
        opts = {**allowed, **algorithm_kwargs}
        checks = {"clip_factor": {}, "eps": {}, "z_thresh": {}, "warmup_steps": {"integer": True},
                  "history": {"integer": True}, "alpha": {"below_one": True}, "quantile": {"below_one": True}}
        for key, extra in checks.items():
            if key in opts:
                opts[key] = number(key, opts[key], positive=True, strings=False, **extra)
        if algorithm == "quantile" and opts["warmup_steps"] > opts["history"]:
            raise SpecError("warmup_steps", opts["warmup_steps"],
                            f"use warmup_steps <= history={opts['history']}")

        self.max_norm = max_norm
        self.algorithm = algorithm
        self.max_value = max_value
        self.per = per
        self.exclude = tuple(exclude)
        self.options = opts
        self.last_total_norm: torch.Tensor | None = None
        self.last_clip_coef: torch.Tensor | None = None
        self.last_threshold: torch.Tensor | None = None
        self._states: dict[int, RunningNormStats | NormHistory] = {}
        self._excluded_ids: frozenset[int] = frozenset()
        self._steps = BatchSteps()  # items: (metric scope, total norm, coefficient, threshold)
        self._key_prefix = "grad_clip/"  # resolved at setup (several clippers: grad_clip/<algorithm>/)
        self._log_total_norm = True  # resolved at setup: False when OptimizerMonitor logs the same norm

    @property
    def state_key(self) -> str:
        """Checkpoint key, distinct per configuration so several instances can coexist."""
        # Lightning reads state_key on every hook call: build the string once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._generate_state_key(algorithm=self.algorithm, max_norm=self.max_norm,
                                           max_value=self.max_value, per=self.per, exclude=self.exclude,
                                           norm_type=self.norm_type, **self.options)
            self.__dict__["_state_key"] = key
        return key

    @property
    def grad_norm_types(self) -> tuple[float, ...]:
        """Norm types this callback reads, precomputed by whichever callback reads gradients first."""
        return (self.norm_type,)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse ``Trainer(gradient_clip_val=...)`` and sharded strategies, start a fit's state afresh and
        resolve ``exclude`` patterns."""
        if stage == "fit":
            refuse_sharded_strategy(trainer, "GradientClipping", "remove GradientClipping and set "
                                    "Trainer(gradient_clip_val=...), or use strategy='ddp'")
            self._key_prefix = self._own_key_prefix(trainer)
            self._log_total_norm = not self._total_norm_logged_elsewhere(trainer)
            join_rows(trainer)  # one row per step with Lightning's own
            order_gradient_stages(trainer)  # after the monitor observes, before the guard decides
            # a new fit starts fresh; resuming from a checkpoint restores the state after setup
            self._states = {}
            self.last_total_norm = self.last_clip_coef = self.last_threshold = None
            self._steps.reset()
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val is not None and clip_val != 0:
            raise SpecError("Trainer(gradient_clip_val)", clip_val,
                            "pick one: remove gradient_clip_val from the Trainer, or remove the "
                            "GradientClipping callback",
                            problem="clips gradients a second time alongside GradientClipping")
        if getattr(trainer, "gradient_clip_algorithm", None) is not None:
            raise SpecError("Trainer(gradient_clip_algorithm)", str(trainer.gradient_clip_algorithm),
                            "remove gradient_clip_algorithm from the Trainer; "
                            "GradientClipping(algorithm=...) chooses the algorithm",
                            problem="conflicts with GradientClipping")
        excluded: set[int] = set()
        aliases = param_names(pl_module)  # every name of a parameter, _orig_mod. stripped, as plan() matches
        for pattern in self.exclude:
            hits = [p for p in pl_module.parameters() if any(
                fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")
                for name in aliases.of(p))]
            if not hits:
                names = [n for n, _ in named_parameters(pl_module)]
                hint = closest(pattern, names)
                raise SpecError("exclude", pattern, (f"did you mean {hint[0]!r}? " if hint else "")
                                + "use a pattern matching parameter names of the LightningModule",
                                problem="matches no parameter")
            excluded.update(id(p) for p in hits)
        self._excluded_ids = frozenset(excluded)
        if self.algorithm == "agc":
            self._refuse_sparse_agc(pl_module)

    def _refuse_sparse_agc(self, pl_module: pl.LightningModule) -> None:
        """AGC clips each output unit of a weight against that unit's norm: a sparse gradient has no such rows."""
        sparse = sparse_grad_ids(pl_module) - self._excluded_ids
        names = [name for name, p in named_parameters(pl_module) if id(p) in sparse and p.requires_grad]
        if names:
            raise SpecError(f"parameter {names[0]!r}", "sparse gradient",
                            f"exclude it (GradientClipping(algorithm='agc', exclude=[{names[0]!r}])), use "
                            "algorithm='norm' or 'value' (both handle sparse gradients), or build the embedding "
                            "with sparse=False", problem="gets sparse gradients (nn.Embedding(sparse=True)), which "
                            "algorithm='agc' cannot clip unit-wise")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse sharded layouts without exact norms (once ``configure_model`` has sharded the module)."""
        check_sharded_layout(pl_module, "GradientClipping")
        if self.algorithm != "agc":
            return
        for name, p in pl_module.named_parameters():
            dims = shard_dims(p)
            if p.requires_grad and p.ndim > 1 and any(d != 0 for d in dims):
                raise SpecError(f"parameter {name!r}", tuple(p.placements), "shard it along dim 0 (fully_shard's "
                                "default), exclude it (GradientClipping(..., exclude=[...])), or use "
                                "algorithm='norm'", problem=f"is split along dim {dims}, so the unit-wise norms "
                                "of algorithm='agc' (per output row) would cross shards")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Compute the pre-clip norm, clip, record and (on logging steps) log."""
        ensure_unscaled(trainer, optimizer)
        view = step_view(trainer, optimizer)
        # the norms of the gradients as they stand (shared with the other stages at this step; after
        # another clipping callback, those of its result)
        params, norms = view.current_norms(self.norm_type, self._excluded_ids)
        if not params:
            return
        device = params[0].grad.device
        total = combine_norms(norms, self.norm_type, device)
        grads = [p.grad for p in params]
        threshold = None

        if self.algorithm == "norm" and self.per == "global":
            coef = clip_coefficient(self.max_norm, total)
            self._apply_global(view, grads, coef)
        elif self.algorithm == "norm":
            if self.per == "param":
                coefs = [clip_coefficient(self.max_norm, n) for n in norms]
            else:
                coefs = self._group_coefs(view.raw, params, norms, device)
            _mul_grads_(grads, coefs)
            view.note_modified()
            post = combine_norms([c * n for c, n in zip(coefs, norms, strict=True)], self.norm_type, device)
            coef = post / (total + _EPS)
        elif self.algorithm in ("zscore", "quantile"):
            threshold = self._adaptive_threshold(view.index, total, device)
            coef = clip_coefficient(threshold, total)
            self._apply_global(view, grads, coef)
        else:  # value, agc: element/unit-wise, the effective coefficient needs a post-clip norm
            deferred = view.take_deferred_scale()  # an earlier clipper's coefficient, not yet applied
            if deferred is not None:
                _scale_grads_(view.grads, deferred)
            if self.algorithm == "value":
                _clamp_grads_(params, self.max_value)
            else:
                self._agc(params)
            view.note_modified()
            coef = None
            if view.logging or self.last_clip_coef is None:
                post = combine_norms(tensor_norms(grads, self.norm_type), self.norm_type, device)
                nan = torch.full_like(total, math.nan)
                coef = torch.where(torch.isfinite(total), post / (total + _EPS), nan)

        self.last_total_norm = total
        if coef is not None:
            self.last_clip_coef = coef
        self.last_threshold = threshold
        self._steps.stepped(view.index, (view.scope, total, coef, threshold))
        if view.logging:
            self._record(trainer, view.scope, total, self.last_clip_coef, threshold)
            self._steps.logged()

    def _own_key_prefix(self, trainer: pl.Trainer) -> str:
        """``grad_clip/``; with several GradientClipping callbacks ``grad_clip/<algorithm>/`` (repeats
        ``norm``, ``norm-1``, ... in callback order), so each one's values keep their own keys."""
        clippers = [cb for cb in trainer.callbacks if isinstance(cb, GradientClipping)]
        if len(clippers) < 2 or not any(cb is self for cb in clippers):
            return "grad_clip/"
        seen: dict[str, int] = {}
        for cb in clippers:
            n = seen.get(cb.algorithm, 0)
            seen[cb.algorithm] = n + 1
            if cb is self:
                return f"grad_clip/{cb.algorithm}/" if n == 0 else f"grad_clip/{cb.algorithm}-{n}/"
        return "grad_clip/"  # unreachable: self is among the clippers

    def _total_norm_logged_elsewhere(self, trainer: pl.Trainer) -> bool:
        """Whether ``total_norm`` would repeat OptimizerMonitor's ``grad_norm/total``: the monitor logs grad
        norms and this is the first clipper (it sees the gradients unclipped), over every parameter
        (no ``exclude``), with the monitor's 2-norm. Then the monitor owns the key."""
        monitored = any(getattr(cb, "logs_grad_norm_total", False) for cb in trainer.callbacks)
        first = next((cb for cb in trainer.callbacks if isinstance(cb, GradientClipping)), None)
        return monitored and first is self and not self.exclude and self.norm_type == 2.0

    def _record(self, trainer: pl.Trainer, scope: str, total: torch.Tensor, coef: torch.Tensor | None,
                threshold: torch.Tensor | None, step: int | None = None) -> None:
        prefix = self._key_prefix + scope
        values = {}
        if self._log_total_norm:
            values[f"{prefix}total_norm"] = total
        else:  # the monitor logs it as grad_norm/total; EarlyStopping and friends still find it here
            publish_step_metrics(trainer, {f"{prefix}total_norm": total})
        if coef is not None:
            values[f"{prefix}clip_coef"] = coef
        if threshold is not None:
            values[f"{prefix}threshold"] = threshold
        record_step_metrics(trainer, values, step=step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Write the values recorded on this logging batch (one row, one host transfer)."""
        self._steps.end_batch(trainer, lambda item, step: self._record(trainer, *item, step=step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the last batch when the Trainer was told to stop after its optimizer step.

        Lightning writes its row for the batch it stops at even when the stop came after the step
        (Timer, or a callback's ``on_train_batch_end``), which the step itself could not know.
        """
        self._steps.end_training(trainer, lambda item, step: self._record(trainer, *item, step=step))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Write a stop row recorded in ``on_train_end`` (after every callback's, so it is one row) and give the
        loggers back their own ``log_metrics``."""
        stop_joining_rows(trainer)

    # ------------------------------------------------------------------ algorithms
    def _apply_global(self, view: StepView, grads: list[torch.Tensor], coef: torch.Tensor) -> None:
        if view.accepts_modifiers and not self._excluded_ids:
            view.defer_scale(coef)  # applied by the kit optimizer's step (fused: inside the update)
        else:
            _scale_grads_(grads, coef)
            view.note_modified()

    def _group_coefs(self, raw: torch.optim.Optimizer, params: list[torch.Tensor],
                     norms: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        where = {id(p): i for i, p in enumerate(params)}
        coefs: list[torch.Tensor | None] = [None] * len(params)
        for group in raw.param_groups:
            members = [where[id(p)] for p in group["params"] if id(p) in where]
            if not members:
                continue
            group_norm = combine_norms([norms[i] for i in members], self.norm_type, device)
            c = clip_coefficient(self.max_norm, group_norm)
            for i in members:
                if coefs[i] is None:
                    coefs[i] = c
        return coefs  # type: ignore[return-value]

    def _agc(self, params: list[torch.Tensor]) -> None:
        factor, eps = self.options["clip_factor"], self.options["eps"]
        # Sharded (FSDP2, Shard(0), checked at train start): a weight's output units are whole rows, so
        # their norms are local to the shard; a 1-D tensor is one unit split across ranks, its norms
        # are reduced (one collective for all of them).
        whole = [p for p in params if p.ndim <= 1 and shard_dims(p)]
        norms = tensor_norms([*whole, *(p.grad for p in whole)], self.norm_type)
        reduced = dict(zip(map(id, whole), zip(norms[:len(whole)], norms[len(whole):])))
        for p in params:
            if p.grad.is_sparse:  # not from a sparse embedding, which setup refuses: found only now
                raise SpecError("algorithm", "agc", "exclude the parameter, or use algorithm='norm' or 'value'",
                                problem=f"cannot clip the sparse gradient of a parameter of shape {tuple(p.shape)}")
            g = local_tensors([p.grad])[0]
            if id(p) in reduced:
                pnorm, gnorm = reduced[id(p)]
            else:
                pnorm, gnorm = _unit_norms(local_tensors([p])[0], self.norm_type), _unit_norms(g, self.norm_type)
            limit = pnorm.clamp_min(eps) * factor
            scale = torch.clamp(limit / gnorm.clamp_min(_EPS), max=1.0)
            g.mul_(scale.to(g.dtype))

    def _adaptive_threshold(self, idx: int, total: torch.Tensor, device: torch.device) -> torch.Tensor:
        state = self._states.get(idx)
        if state is None:
            state = self._new_state()
            self._states[idx] = state
        fallback = torch.full((), math.inf if self.max_norm is None else self.max_norm, device=device,
                              dtype=total.dtype)
        if isinstance(state, RunningNormStats):
            upper = state.upper(self.options["z_thresh"], device)
            threshold = torch.where(state.ready(device), upper, fallback)
            state.update(torch.minimum(total, threshold))  # spikes enter the EMA clipped, as in ZClip
        else:
            threshold = torch.where(state.ready(device), state.value(device), fallback)
            state.update(total)
        return threshold

    def _new_state(self) -> RunningNormStats | NormHistory:
        o = self.options
        if self.algorithm == "zscore":
            return RunningNormStats(alpha=o["alpha"], warmup=o["warmup_steps"])
        return NormHistory(length=o["history"], quantile=o["quantile"], warmup=o["warmup_steps"])

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Adaptive state per optimizer index (zscore: EMA mean/var/count; quantile: history)."""
        return {"algorithm": self.algorithm, "states": {i: s.state_dict() for i, s in self._states.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the adaptive state saved by :meth:`state_dict`.

        Lightning hands a callback only the state saved under its own :attr:`state_key`, which
        includes the algorithm, so the state always comes from the same algorithm.
        """
        self._states = {}
        for i, s in state_dict.get("states", {}).items():
            state = self._new_state()
            state.load_state_dict(s)
            self._states[int(i)] = state
