"""OptimizerMonitor: learning rates, gradient/parameter/update norms, logged every N optimizer steps."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_optkit.callbacks._step_metrics import (
    join_rows,
    record_step_tensors,
    seal_step_metrics,
    stop_joining_rows,
)
from lightning_optkit.callbacks.amp import ensure_unscaled
from lightning_optkit.callbacks.base import LeanCallback
from lightning_optkit.callbacks.cadence import is_logging_step, logger_step
from lightning_optkit.callbacks.naming import group_labels, optimizer_labels
from lightning_optkit.callbacks.sharded_checks import check_sharded_layout, refuse_sharded_strategy
from lightning_optkit.callbacks.stages import GradientRole, clip_reports, order_gradient_stages
from lightning_optkit.callbacks.step_norms import step_view
from lightning_optkit.errors import SpecError, closest
from lightning_optkit.norms import tensor_norms
from lightning_optkit.param_names import named_parameters
from lightning_optkit.sharding import any_sharded
from lightning_optkit.validation import flag, number

__all__ = ["OptimizerMonitor"]

NORM_NAMES = ("grad", "param", "update")


def _layer_name(param_name: str, depth: int) -> str:
    """``encoder.layers.0.weight`` -> ``encoder.layers`` (depth 2); a root-level parameter keeps its name."""
    module_path = param_name.split(".")[:-1]
    return ".".join(module_path[:depth]) if module_path else param_name


def _auto_layer_name(param_name: str, block_patterns: Sequence[re.Pattern]) -> str:
    """The layer a user has: the block a spec's ``layer_decay`` depth regex finds (the name up to its index:
    ``blocks.3``), else the first numbered module (``encoder.layers.3`` of ``encoder.layers.3.linear1.weight``),
    else the module path cut to two components; a root-level parameter keeps its name."""
    for pattern in block_patterns:
        match = pattern.search(param_name)
        if match:
            return param_name[:match.end(1)]
    module_path = param_name.split(".")[:-1]
    for i, part in enumerate(module_path):
        if part.isdigit():
            return ".".join(module_path[:i + 1])
    return _layer_name(param_name, 2)


def _layer_decay_patterns(pl_module: Any) -> list[re.Pattern]:
    """The ``layer_decay`` depth regexes of the module's kit spec (OptimizerMixin), if any."""
    get_spec = getattr(pl_module, "_optkit_spec", None)
    if get_spec is None:
        return []
    try:
        specs = get_spec()
    except SpecError:  # a mixin module without a spec
        return []
    return [re.compile(s.layer_decay["depth"][3:]) for s in specs.members if s.layer_decay]


def _norm2(values: Iterable[float]) -> float:
    """2-norm of a vector given its parts' 2-norms, accumulated in float64."""
    return math.sqrt(math.fsum(v * v for v in values))


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


@dataclass
class _LoggingPlan:
    """How one optimizer is reported: its key scope, group names and each parameter's layer."""

    optimizer: Any
    scope: str  # "" with one optimizer, else "<name>/"
    group_keys: list[str]
    params: list[torch.Tensor]
    layer_of: dict[int, str]  # id(param) -> layer name
    signature: tuple[int, ...]


@dataclass
class _PendingStep:
    """Device tensors recorded at the optimizer steps of one logging batch, resolved at its end.

    Grad norms, hyperparameters and the clip coefficient are those of the optimizer's last step in the
    batch; param norms and the snapshot (for the update) are from before its first step.
    """

    plan: _LoggingPlan
    hparams: dict[str, float | torch.Tensor]
    grad_layers: list[str] = field(default_factory=list)
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    param_norms: list[torch.Tensor] = field(default_factory=list)
    snapshot: list[torch.Tensor] | None = None
    clip_coef: torch.Tensor | None = None
    coefs_before: list[Any] = field(default_factory=list)  # each clipper's last_clip_coef before this step


def _validated_norms(norms: Sequence[str] | str) -> tuple[str, ...]:
    names = (norms,) if isinstance(norms, str) else tuple(norms)
    for name in names:
        if name not in NORM_NAMES:
            hint = closest(str(name), NORM_NAMES)
            raise SpecError("norms", norms, f"use a subset of {NORM_NAMES}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                            problem=f"contains the unknown norm {name!r}")
    return tuple(n for n in NORM_NAMES if n in names)


class OptimizerMonitor(LeanCallback):
    """Log learning rates and gradient, parameter and update norms through the Trainer's loggers.

    Every ``every_n_steps`` optimizer steps (default: ``Trainer(log_every_n_steps)``), on the same
    batches and step axis as Lightning's own ``self.log`` rows (and, like them, on the batch the
    Trainer was told to stop at, when the stop is decided before the optimizer step, e.g. in
    ``training_step``; a stop decided after it, as Timer's, comes too late for the update norm, which
    needs the parameters from before the step). Norms are 2-norms computed with batched foreach
    kernels, kept on device, and moved to the host in one transfer per logging step; steps that
    do not log cost no host sync, no kernel and no extra memory. Update norms need the parameters from
    before the step, so they are copied, on logging steps only (one extra copy of the parameters, freed
    at the end of the batch). Works with automatic and manual optimization (several optimizers) and
    with gradient accumulation (norms of the accumulated gradient, once per optimizer step). Under DDP
    the gradients seen are the reduced ones; only global rank 0 computes and logs (no collectives).
    Norms of sharded strategies (FSDP, DeepSpeed) would be per-shard and are not supported.

    Args:
        every_n_steps: log every N optimizer steps (batches that stepped); None: the Trainer's
            ``log_every_n_steps``.
        per_layer: also log norms per layer (see ``layer_depth``; a parameter held by the root module is
            its own layer).
        layer_depth: ``None`` (default): the layers the model has: the blocks of the spec's
            ``layer_decay`` depth regex when the module has a kit spec with one (``blocks.3``), else the
            first numbered module of the name (``encoder.layers.3`` for an ``nn.TransformerEncoder``,
            ``backbone.0`` in an ``nn.Sequential``), else the module path cut to two components. An
            integer: the module path cut to that many components (``encoder.layers.0.weight`` ->
            ``encoder.layers`` at 2).
        norms: which norms to log, a subset of ``("grad", "param", "update")``.
        momentum: also log momentum (``momentum``, or ``betas[0]`` for Adam-like optimizers).
        histograms: also log a ``wandb.Histogram`` of the per-layer gradient norms (needs a
            WandbLogger, ``per_layer=True`` and ``"grad"`` in ``norms``).

    Names: a param group is named by its ``"name"`` entry, else ``pg<index>`` (``pg0``, ``pg1``...); in a
    ChainedOptimizer (a ChainSpec) by ``<member>/<group>`` (``Muon/default``, ``AdamW/default``).
    An optimizer is labelled by its kit spec name when it was built from a spec, else by its class;
    repeats get ``-1``, ``-2``... (``Adam``, ``Adam-1``); GradientClipping and NonFiniteGuard use the
    same labels. ``<s>`` below is ``<group>`` with one optimizer and ``<label>/<group>`` with several;
    ``<o>`` is empty with one optimizer and ``<label>/`` with several.

    ===================================  ===========================================================
    Key                                  Value
    ===================================  ===========================================================
    ``lr/<s>``                           learning rate the logged step used
    ``momentum/<s>``                     momentum or beta1 (``momentum=True``, if the group has one)
    ``weight_decay/<s>``                 weight decay (if the group has one)
    ``grad_norm/<o>total``               total gradient norm, before clipping (unscaled, accumulated)
    ``grad_norm/<o>total_clipped``       total gradient norm after clipping (GradientClipping only)
    ``grad_norm/<o>clip_coef``           the overall clip coefficient, with several clipping callbacks
                                         (with one GradientClipping: its ``grad_clip/<o>clip_coef``)
    ``param_norm/<o>total``              parameter norm before the step
    ``update_norm/<o>total``             norm of the change the step made to the parameters
    ``update_ratio/<o>total``            ``update_norm / param_norm``
    ``grad_norm/layer/<layer>``          per-layer gradient norm, before clipping (``per_layer``)
    ``param_norm/layer/<layer>``         per-layer parameter norm before the step (``per_layer``)
    ``update_norm/layer/<layer>``        per-layer update norm (``per_layer``)
    ``update_ratio/layer/<layer>``       per-layer ``update_norm / param_norm`` (``per_layer``)
    ``grad_norm/layer_histogram``        ``wandb.Histogram`` of per-layer grad norms (``histograms``)
    ===================================  ===========================================================

    Gradient norms are pre-clip whatever the callback order: the monitor observes the gradients, so it
    runs ahead of the stages that modify them (:mod:`lightning_optkit.callbacks.stages`), which then
    reuse the norms computed here.
    If an optimizer steps several times in one batch (manual optimization, e.g. an n-critic loop):
    ``grad_norm``, ``lr``/``momentum``/``weight_decay`` and the clip keys are those of its last step
    in the batch; ``param_norm`` is from before its first step and ``update_norm`` is the total change
    over the batch (all its steps), so ``update_ratio`` is the relative change over the batch.
    ``total_clipped`` and ``clip_coef`` come from the clipping callbacks' ``last_clip_coef`` (with
    several, their product: the overall coefficient) and are left out when one did not set a new one
    during the logged step (GradientClipping's ``value``/``agc`` refresh it on Lightning's logging
    steps only).
    """

    #: Reads the step's gradients, changes nothing: runs ahead of clipping and the guard.
    gradient_role: ClassVar[GradientRole] = "observe"

    @property
    def grad_norm_types(self) -> tuple[float, ...]:
        """None declared: the monitor reads the 2-norms on logging steps only, computed then."""
        return ()

    @property
    def logs_grad_norm_total(self) -> bool:
        """Read by GradientClipping: the monitor owns the pre-clip total norm (``grad_norm/total``)."""
        return "grad" in self.norms

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        per_layer: bool = True,
        layer_depth: int | None = None,
        norms: Sequence[str] | str = NORM_NAMES,
        momentum: bool = True,
        histograms: bool = False,
    ) -> None:
        every_n_steps = number("every_n_steps", every_n_steps, integer=True, at_least=1, allow_none=True,
                               strings=False, fix="pass an integer >= 1, or None to follow Trainer(log_every_n_steps)")
        layer_depth = number("layer_depth", layer_depth, integer=True, at_least=1, strings=False, allow_none=True,
                             fix="pass an integer >= 1 (1 groups by top-level module), or None to follow the "
                             "model's numbered blocks")
        for flag_name, value in (("per_layer", per_layer), ("momentum", momentum), ("histograms", histograms)):
            flag(flag_name, value)
        self.norms = _validated_norms(norms)
        if histograms and not (per_layer and "grad" in self.norms):
            raise SpecError("histograms", histograms,
                            "set per_layer=True and keep 'grad' in norms, or set histograms=False",
                            problem=f"needs per-layer grad norms (per_layer={per_layer}, norms={self.norms})")
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.layer_depth = layer_depth
        self.momentum = momentum
        self.histograms = histograms

        self._every: int = 0  # resolved at setup; 0 means never
        self._active = False  # False on non-zero ranks and when logging is off
        self._plans: dict[int, _LoggingPlan] = {}  # id(raw optimizer) -> plan
        self._names: dict[int, str] = {}  # id(param) -> full parameter name
        self._pending: dict[int, _PendingStep] = {}
        self._pending_step = -1  # logger step of the batch the pending records belong to
        self._clips: list[Callback] = []
        self._log_clip_coef = True  # resolved at setup
        self._awaiting_clip: _PendingStep | None = None
        self._wandb_loggers: list[Any] = []
        self._block_patterns: list[re.Pattern] = []  # layer_decay depth regexes (layer_depth=None)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the logging period, check the loggers and find a clipping callback."""
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, "OptimizerMonitor", "remove OptimizerMonitor, or train with "
                                "strategy='ddp'")
        if not trainer.loggers:
            raise SpecError("Trainer(logger)", False,
                            "give the Trainer a logger (e.g. WandbLogger) or remove OptimizerMonitor",
                            problem="leaves OptimizerMonitor with nowhere to log")
        from lightning.pytorch.loggers import WandbLogger

        self._wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if self.histograms and not self._wandb_loggers:
            found = [type(lg).__name__ for lg in trainer.loggers]
            raise SpecError("histograms", True,
                            "add a WandbLogger to the Trainer's loggers or set histograms=False",
                            problem=f"needs a WandbLogger, but the Trainer's loggers are {found}")
        self._every = self.every_n_steps if self.every_n_steps is not None else trainer.log_every_n_steps
        if self._every < 1:
            rank_zero_warn("OptimizerMonitor(every_n_steps=None) follows Trainer(log_every_n_steps=0), "
                           "which turns logging off: the monitor will log nothing. "
                           "Pass every_n_steps to log anyway.")
        self._active = trainer.global_rank == 0 and self._every >= 1
        join_rows(trainer)  # one row per step with Lightning's own and the other kit callbacks'
        order_gradient_stages(trainer)  # ahead of clipping: the norms logged are backward's
        self._clips = clip_reports(trainer)
        # one clipper that logs its coefficient (GradientClipping's grad_clip/clip_coef): not repeated here
        self._log_clip_coef = not (len(self._clips) == 1 and getattr(self._clips[0], "logs_clip_coef", False))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Name every optimizer, group and parameter (host-side, once); refuse sharded layouts without exact
        norms.

        Sharded (FSDP2) norms are collectives, so every rank computes them on logging steps (rank 0 alone
        logs); under DDP only rank 0 does.
        """
        check_sharded_layout(pl_module, "OptimizerMonitor")
        if any_sharded(pl_module.parameters()):
            self._active = self._every >= 1
        self._pending.clear()
        self._awaiting_clip = None
        self._names = {id(p): name for name, p in named_parameters(pl_module)}  # _orig_mod. stripped
        self._block_patterns = _layer_decay_patterns(pl_module) if self.layer_depth is None else []
        self._plans = {}
        names = optimizer_labels(trainer)
        several = len(trainer.optimizers) > 1
        for opt, name in zip(trainer.optimizers, names, strict=True):
            self._plans[id(opt)] = self._make_plan(opt, f"{name}/" if several else "")

    def _make_plan(self, optimizer: Any, scope: str) -> _LoggingPlan:
        group_keys = group_labels(optimizer)
        if len(set(group_keys)) != len(group_keys):
            raise SpecError("param_groups names", group_keys, "give every param group of one optimizer a "
                            "distinct 'name'", problem=f"repeat a name in {type(optimizer).__name__}, so "
                            "OptimizerMonitor keys would collide")
        params: list[torch.Tensor] = []
        seen: set[int] = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        layer_of = {id(p): self._layer(self._names[id(p)]) if id(p) in self._names else "unregistered"
                    for p in params}
        signature = tuple(len(g["params"]) for g in optimizer.param_groups)
        return _LoggingPlan(optimizer, scope, [f"{scope}{k}" for k in group_keys], params, layer_of, signature)

    def _layer(self, param_name: str) -> str:
        if self.layer_depth is None:
            return _auto_layer_name(param_name, self._block_patterns)
        return _layer_name(param_name, self.layer_depth)

    def _plan_for(self, optimizer: Any) -> _LoggingPlan:
        plan = self._plans.get(id(optimizer))
        if plan is None or plan.signature != tuple(len(g["params"]) for g in optimizer.param_groups):
            scope = plan.scope if plan is not None else ""
            plan = self._plans[id(optimizer)] = self._make_plan(optimizer, scope)
        return plan

    # ------------------------------------------------------------------ per step
    def _is_logging_batch(self, trainer: pl.Trainer) -> bool:
        return self._active and is_logging_step(trainer, self._every)

    def _hparams(self, plan: _LoggingPlan) -> dict[str, float | torch.Tensor]:
        out: dict[str, float | torch.Tensor] = {}
        for key, group in zip(plan.group_keys, plan.optimizer.param_groups, strict=True):
            out[f"lr/{key}"] = group["lr"]
            if self.momentum:
                if "betas" in group:
                    out[f"momentum/{key}"] = group["betas"][0]
                elif "momentum" in group:
                    out[f"momentum/{key}"] = group["momentum"]
            if "weight_decay" in group:
                out[f"weight_decay/{key}"] = group["weight_decay"]
        return out

    def _harvest_clip(self) -> None:
        """Attach the clip coefficient of the step recorded last (the clipping callback ran since)."""
        pending, self._awaiting_clip = self._awaiting_clip, None
        if pending is None or not self._clips:
            return
        coefs = [getattr(clip, "last_clip_coef", None) for clip in self._clips]
        # every clipper set a new coefficient during this step: the product is the overall one (each is
        # its own post/pre ratio, and each clipper starts from the one before's result)
        if all(isinstance(c, torch.Tensor) and c is not b for c, b in zip(coefs, pending.coefs_before, strict=True)):
            total = coefs[0].detach().clone()  # a copy: the callback may update its tensor in place later
            for c in coefs[1:]:
                total = total * c.detach().to(total.device)
            pending.clip_coef = total

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """On logging steps: record grad and param norms and snapshot the parameters (all on device)."""
        if not self._is_logging_batch(trainer):
            return
        step = logger_step(trainer)
        if self._pending and self._pending_step != step:  # left over from a batch that never reached its end
            self._pending.clear()
            self._awaiting_clip = None
        self._pending_step = step
        if "grad" in self.norms:
            ensure_unscaled(trainer, optimizer)
        view = step_view(trainer, optimizer)
        raw = view.raw
        self._harvest_clip()  # the clipping callback has run for the previously recorded step
        pending = self._pending.get(id(raw))
        with torch.no_grad():
            if pending is None:  # first step of this optimizer in the batch: state before the batch
                plan = self._plan_for(raw)
                pending = _PendingStep(plan, {})
                if "param" in self.norms or "update" in self.norms:
                    pending.param_norms = tensor_norms(plan.params, 2.0)
                if "update" in self.norms:
                    pending.snapshot = [p.detach().clone() for p in plan.params]
            # every step (n-critic loops step one optimizer several times): the latest step wins
            pending.hparams = self._hparams(pending.plan)
            pending.clip_coef = None
            if "grad" in self.norms:
                # computed before GradientClipping (which runs after us, see setup) modifies them
                with_grad, pending.grad_norms = view.pre_norms(2.0)
                pending.grad_layers = [pending.plan.layer_of.get(id(p), "unregistered") for p in with_grad]
        self._pending[id(raw)] = pending
        if self._clips:
            self._awaiting_clip = pending
            pending.coefs_before = [getattr(clip, "last_clip_coef", None) for clip in self._clips]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After the step(s) of a logging batch: update norms, then the row with its one host transfer."""
        if not self._pending:
            return
        self._harvest_clip()
        pending = list(self._pending.values())
        self._pending.clear()
        with torch.no_grad():
            tensors, resolve = self._collect(pending, trainer)
        if trainer.global_rank != 0:
            return  # the other ranks computed the sharded norms' collectives with rank 0
        record_step_tensors(trainer, tensors, resolve, step=logger_step(trainer))
        seal_step_metrics(trainer)

    def _collect(self, pending: list[_PendingStep], trainer: pl.Trainer
                 ) -> tuple[list[torch.Tensor], Callable[[list[float]], tuple[dict[str, Any], dict[Any, Any]]]]:
        """The batch's device tensors (update norms computed now), and the function that turns their host
        values into the monitor's keys (:meth:`_metrics`) at the row's transfer."""
        tensors: list[torch.Tensor] = []
        slots = []

        def add(ts: Sequence[torch.Tensor]) -> slice:
            tensors.extend(ts)
            return slice(len(tensors) - len(ts), len(tensors))

        hparams: dict[str, float | torch.Tensor] = {}
        stepped = {id(p.plan.optimizer) for p in pending}
        for opt in trainer.optimizers:  # optimizers that did not step in this batch: their current values
            if id(opt) not in stepped:
                hparams.update(self._hparams(self._plan_for(opt)))
        for p in pending:
            hparams.update(p.hparams)
            update_norms: list[torch.Tensor] = []
            if p.snapshot is not None:
                torch._foreach_sub_(p.snapshot, [q.detach() for q in p.plan.params])  # before - after
                update_norms = tensor_norms(p.snapshot, 2.0)
                p.snapshot = None
            slots.append((p, add(p.grad_norms), add(p.param_norms), add(update_norms),
                          add([p.clip_coef] if p.clip_coef is not None else [])))
        tensor_hparams = {k: v for k, v in hparams.items() if isinstance(v, torch.Tensor)}
        hp_slot = add([v.detach() for v in tensor_hparams.values()])
        host_hparams = {k: float(v) for k, v in hparams.items() if not isinstance(v, torch.Tensor)}

        def resolve(values: list[float]) -> tuple[dict[str, Any], dict[Any, Any]]:
            metrics: dict[str, Any] = dict(host_hparams)
            metrics.update(zip(tensor_hparams, values[hp_slot], strict=True))
            histogram_values = self._metrics(metrics, [(p, *(values[s] for s in rest)) for p, *rest in slots])
            return metrics, self._histograms(histogram_values)

        return tensors, resolve

    def _metrics(self, metrics: dict[str, Any], slots: list[tuple[_PendingStep, list[float], list[float],
                                                                  list[float], list[float]]]) -> list[float]:
        """Add the totals and per-layer norms (host values) to ``metrics``; return the histogram's values."""
        layer_grad: dict[str, list[float]] = {}
        layer_param: dict[str, list[float]] = {}
        layer_update: dict[str, list[float]] = {}
        for p, grads, params, updates, coef in slots:
            scope = p.plan.scope
            param_layers = [p.plan.layer_of[id(q)] for q in p.plan.params]
            if "grad" in self.norms:
                total = _norm2(grads)
                metrics[f"grad_norm/{scope}total"] = total
                if coef:
                    metrics[f"grad_norm/{scope}total_clipped"] = total * coef[0]
                    if self._log_clip_coef:
                        metrics[f"grad_norm/{scope}clip_coef"] = coef[0]
                for layer, v in zip(p.grad_layers, grads, strict=True):
                    layer_grad.setdefault(layer, []).append(v)
            if params:
                param_total = _norm2(params)
                if "param" in self.norms:
                    metrics[f"param_norm/{scope}total"] = param_total
                for layer, v in zip(param_layers, params, strict=True):
                    layer_param.setdefault(layer, []).append(v)
            if updates:
                update_total = _norm2(updates)
                metrics[f"update_norm/{scope}total"] = update_total
                metrics[f"update_ratio/{scope}total"] = _ratio(update_total, param_total)
                for layer, v in zip(param_layers, updates, strict=True):
                    layer_update.setdefault(layer, []).append(v)
        histogram_values: list[float] = []
        if self.per_layer:
            for layer, vals in layer_grad.items():
                metrics[f"grad_norm/layer/{layer}"] = _norm2(vals)
                histogram_values.append(metrics[f"grad_norm/layer/{layer}"])
            if "param" in self.norms:
                for layer, vals in layer_param.items():
                    metrics[f"param_norm/layer/{layer}"] = _norm2(vals)
            for layer, vals in layer_update.items():
                u = metrics[f"update_norm/layer/{layer}"] = _norm2(vals)
                metrics[f"update_ratio/layer/{layer}"] = _ratio(u, _norm2(layer_param.get(layer, [])))
        return histogram_values

    def _histograms(self, histogram_values: list[float]) -> dict[Any, dict[str, Any]]:
        """The ``wandb.Histogram`` of the per-layer grad norms, for each WandbLogger (``histograms``)."""
        if not (self.histograms and histogram_values):
            return {}
        import wandb

        histogram = wandb.Histogram(histogram_values)
        return {lg: {"grad_norm/layer_histogram": histogram} for lg in self._wandb_loggers}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Write a row Lightning did not join and give the loggers back their own ``log_metrics``."""
        stop_joining_rows(trainer)
