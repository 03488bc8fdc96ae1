"""OptimizerMixin: ``configure_optimizers`` from a spec, and ``manual_step`` for several optimizers."""

from __future__ import annotations

from typing import Any

import torch

from lightning_optkit.build import build_optimizers
from lightning_optkit.callbacks.base import LeanCallback
from lightning_optkit.errors import SpecError
from lightning_optkit.internals import module_trainer
from lightning_optkit.params import optimizer_labels
from lightning_optkit.registry import optimizer_info
from lightning_optkit.spec_set import SpecSet, normalise_spec
from lightning_optkit.unwrap import raw_optimizer


class OptimizerMixin:
    """Mix into a LightningModule (before ``L.LightningModule``) to build its optimizers from a spec.

    The spec comes from ``self.optim_spec`` (an OptimizerSpec, ChainSpec, list, or dict) or else from
    ``self.hparams["optim"]`` (a dict, so ``save_hyperparameters()`` records it and LightningCLI YAML
    can set it). With several optimizers the module runs in manual optimization and
    ``training_step`` calls :meth:`manual_step` once per optimizer.
    """

    optim_spec: Any = None

    # --- the spec --------------------------------------------------------------------------------
    def _optkit_spec(self) -> SpecSet:
        source = self.optim_spec
        if source is None:
            hparams = getattr(self, "hparams", None)
            source = hparams.get("optim") if hparams is not None else None
        if source is None:
            raise SpecError("optim_spec", None, "set self.optim_spec = OptimizerSpec(...) in __init__, or pass "
                            "optim={...} to __init__ and call self.save_hyperparameters()", problem="is not set")
        cached = self.__dict__.get("_optkit_cached")
        if cached is not None and cached[0] is source:
            return cached[1]
        specs = normalise_spec(source)
        self.__dict__["_optkit_cached"] = (source, specs)
        return specs

    def _optkit_several(self) -> bool:
        if self.optim_spec is None and "optim" not in (getattr(self, "hparams", None) or {}):
            return False
        return self._optkit_spec().manual

    # Lightning checks automatic_optimization before configure_optimizers runs (and rejects
    # accumulate_grad_batches / gradient_clip_val for manual optimization there), so a spec with
    # several optimizers must report manual optimization from the start.
    @property
    def automatic_optimization(self) -> bool:  # type: ignore[override]
        """False when the spec has several optimizers (Lightning requires manual optimization then)."""
        if self._optkit_several():
            return False
        return super().automatic_optimization  # type: ignore[misc]

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        super(OptimizerMixin, type(self)).automatic_optimization.fset(self, value)  # type: ignore[attr-defined]

    def configure_optimizers(self) -> Any:
        """Build the optimizers and schedulers from the spec (see :func:`lightning_optkit.build_optimizers`)."""
        # `self.trainer` raises outside a fit; configure_optimizers may also be called on a bare module
        # (then durations must be given in steps).
        trainer = module_trainer(self)
        result = build_optimizers(self, self._optkit_spec(), trainer=trainer)  # type: ignore[arg-type]
        if isinstance(result, list):
            self.__dict__["_optkit_monitors"] = _take_plateau_monitors(result)
        self.__dict__["_optkit_built"] = True  # read by SpecInUseCheck
        return result

    def configure_callbacks(self) -> list:
        """Add the callbacks the spec needs to behave as written.

        ScheduleFreeMode when the spec uses ScheduleFreeAdamW (validation and checkpoints must see its
        averaged weights); RestoreLoaderPosition when a kit schedule resolves its durations from the
        trainer (that sets the train loader up before a checkpoint's loader position is restored,
        Lightning issue #20550, so a stateful loader would silently restart its epoch); ManualStepCheck
        with several optimizers; SpecInUseCheck when the class overrides ``configure_optimizers``.

        Lightning adds these to ``trainer.callbacks`` and, on the next ``fit``/``validate`` with the same
        Trainer, would replace them with an info line naming them ("will override existing callbacks");
        so the ones this method added before are taken out of the Trainer first. One the user passed to
        the Trainer is kept and not added again.
        """
        callbacks = list(super().configure_callbacks() or [])  # type: ignore[misc]
        if self.optim_spec is None and "optim" not in (getattr(self, "hparams", None) or {}):
            return callbacks
        from lightning_optkit.callbacks.loader_position import RestoreLoaderPosition
        from lightning_optkit.callbacks.plateau_check import PlateauMonitorCheck
        from lightning_optkit.callbacks.schedulefree import ScheduleFreeMode
        from lightning_optkit.schedules import Schedule

        specs = self._optkit_spec()
        schedules = specs.schedules
        wanted: list[type] = []
        if any(optimizer_info(s.optimizer_cls).train_eval_modes for s in specs.members):
            wanted.append(ScheduleFreeMode)
        if specs.manual:
            wanted.append(ManualStepCheck)
        if any(isinstance(s, Schedule) for s in schedules):
            wanted.append(RestoreLoaderPosition)
        if any(isinstance(s, Schedule) and s.kind.follows_metric for s in schedules):
            wanted.append(PlateauMonitorCheck)
        if type(self).configure_optimizers is not OptimizerMixin.configure_optimizers:
            wanted.append(SpecInUseCheck)
        trainer = module_trainer(self)
        if trainer is not None:
            present = list(trainer.callbacks)
            if any(getattr(c, "optkit_internal", False) for c in present):
                trainer.callbacks = [c for c in present if not getattr(c, "optkit_internal", False)]
            callbacks_there = [*callbacks, *trainer.callbacks]
        else:
            callbacks_there = callbacks
        for cls in wanted:
            if not any(isinstance(c, cls) for c in callbacks_there):
                callback = cls()
                callback.optkit_internal = True  # added by the mixin: replaced quietly on the next run
                callbacks.append(callback)
        return callbacks

    # --- manual optimization ---------------------------------------------------------------------
    def _optkit_index(self, optimizer: int | str | None, count: int) -> int:
        if optimizer is None:
            if count != 1:
                raise SpecError("optimizer", None, f"pass optimizer=<index or name> to manual_step; there are "
                                f"{count} optimizers", problem="is ambiguous")
            return 0
        if isinstance(optimizer, int) and not isinstance(optimizer, bool):
            if not 0 <= optimizer < count:
                raise SpecError("optimizer", optimizer, f"use an index in 0..{count - 1}", problem="is out of range")
            return optimizer
        specs = self._optkit_spec()
        labels = optimizer_labels(list(specs.per_optimizer))
        if optimizer not in labels:
            raise SpecError("optimizer", optimizer, f"use one of {labels} (set name= on each OptimizerSpec)",
                            problem="is not an optimizer name")
        return labels.index(optimizer)

    def manual_step(self, loss: torch.Tensor, optimizer: int | str | None = None) -> None:
        """Zero_grad, backward, step and zero_grad one optimizer, then step its step-interval schedulers.

        Registered callbacks (GradientClipping, NonFiniteGuard, OptimizerMonitor) run inside the step,
        through Lightning's ``on_before_optimizer_step``. Lightning steps no schedulers in manual
        optimization, so this does: step-interval schedulers after every ``frequency``-th step of their
        optimizer, epoch-interval ones when the first ``manual_step`` of a new epoch runs (plateau
        schedulers read their monitored metric then). Both counts live in the scheduler's own state,
        so they survive a resume.
        """
        opts = self.optimizers()  # type: ignore[attr-defined]
        opts = opts if isinstance(opts, list) else [opts]
        index = self._optkit_index(optimizer, len(opts))
        opt = opts[index]
        raw = raw_optimizer(opt)
        trainer = self.trainer  # type: ignore[attr-defined]
        configs = [c for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is raw]
        for config in configs:
            if config.interval == "epoch":
                # Owed steps: one per `frequency` finished epochs, counted on the scheduler itself.
                owed = trainer.current_epoch // config.frequency
                while getattr(config.scheduler, "optkit_epoch_steps", 0) < owed:
                    config.scheduler.optkit_epoch_steps = getattr(config.scheduler, "optkit_epoch_steps", 0) + 1
                    self._optkit_step_scheduler(config, trainer)
        # Zero first: another optimizer's loss (a GAN's generator loss flows through the discriminator)
        # may have left gradients on these parameters since their last step.
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)  # type: ignore[attr-defined]
        opt.step()
        opt.zero_grad(set_to_none=True)
        for config in configs:
            if config.interval == "step":
                # Kept on the scheduler: torch schedulers save every attribute in their state_dict.
                config.scheduler.optkit_step_calls = getattr(config.scheduler, "optkit_step_calls", 0) + 1
                if config.scheduler.optkit_step_calls % config.frequency == 0:
                    self._optkit_step_scheduler(config, trainer)

    def _optkit_step_scheduler(self, config: Any, trainer: Any) -> None:
        watched = self.__dict__.get("_optkit_monitors", {}).get(id(config.scheduler))
        if watched is None:
            config.scheduler.step()
            return
        monitor, strict = watched
        value = trainer.callback_metrics.get(monitor)
        if value is None:
            if strict:
                raise SpecError("monitor", monitor, f"log it with self.log({monitor!r}, ...) before the scheduler "
                                f"steps, or set strict: false; available: {sorted(trainer.callback_metrics)}",
                                problem="is not a logged metric")
            warned = self.__dict__.setdefault("_optkit_missing_warned", set())
            if monitor not in warned:  # strict: false: once per monitor, as Lightning warns for its own
                warned.add(monitor)
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"ReduceLROnPlateau monitors {monitor!r}, which is not logged (available: "
                               f"{sorted(trainer.callback_metrics)}); the lr is not reduced (strict: false)",
                               category=RuntimeWarning)
            return
        config.scheduler.step(value)


def _take_plateau_monitors(configs: list[dict]) -> dict[int, tuple[str, bool]]:
    """Move monitor keys out of manual-optimization scheduler configs (Lightning drops them there with a
    warning) and remember them for the torch ReduceLROnPlateau schedulers that need a metric to step.
    Kit schedules read their metric themselves."""
    watched: dict[int, tuple[str, bool]] = {}
    for entry in configs:
        config = entry.get("lr_scheduler")
        if not isinstance(config, dict) or "monitor" not in config:
            continue
        monitor, strict = config.pop("monitor"), config.pop("strict", True)
        config.pop("reduce_on_plateau", None)
        if isinstance(config["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau):
            watched[id(config["scheduler"])] = (monitor, strict)
    return watched


class ManualStepCheck(LeanCallback):
    """Fail on the first batch when a module with several optimizers stepped none of them.

    A list spec switches the module to manual optimization; a ``training_step`` that still returns its
    loss (instead of calling ``self.manual_step``) would otherwise train nothing, silently.
    """

    def __init__(self) -> None:
        self._start_step: int | None = None
        self._checked = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Remember the optimizer-step count before the first batch of this fit."""
        if self._start_step is None:
            self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Raise if the first batch ran no optimizer step."""
        if self._checked:
            return
        self._checked = True
        if trainer.global_step == self._start_step:
            raise SpecError("training_step", type(pl_module).__name__,
                            "call self.manual_step(loss, optimizer=<index or name>) for each optimizer in "
                            "training_step (several optimizers run in manual optimization)",
                            problem="stepped no optimizer in its first batch")

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save: the check runs on the first batch of every fit."""
        return {}


class SpecInUseCheck(LeanCallback):
    """Refuse a fit in which the module's own ``configure_optimizers`` ignored its optimizer spec.

    Added by the mixin when the class overrides ``configure_optimizers``: the spec (``optim_spec`` or
    ``hparams["optim"]``) would be dead configuration, silently. An override that calls
    ``super().configure_optimizers()`` uses the spec and passes.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Forget an earlier build: this fit's ``configure_optimizers`` runs after setup."""
        if stage == "fit":
            pl_module.__dict__.pop("_optkit_built", None)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Raise, before the first batch, when the optimizers were not built from the spec."""
        if pl_module.__dict__.get("_optkit_built"):
            return
        name = type(pl_module).__name__
        raise SpecError("configure_optimizers", f"{name}.configure_optimizers",
                        f"delete {name}.configure_optimizers (the mixin builds the optimizers from the spec), "
                        "return super().configure_optimizers() from it, or remove optim_spec / the optim "
                        "hyperparameter", problem="overrides OptimizerMixin's and ignores the optimizer spec the "
                        "module sets, so that spec would never be used")

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save: the check runs in every fit."""
        return {}
