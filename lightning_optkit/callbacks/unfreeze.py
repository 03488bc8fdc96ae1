"""Unfreeze: make frozen parameters trainable at a given epoch or optimizer step (progressive unfreezing).

The optimizer must already hold the frozen parameters (``OptimizerSpec(..., frozen="include")``): torch
optimizers skip a parameter whose ``.grad`` is None, so it stays untouched while frozen and trains with its
planned group (lr, weight decay, schedule) from the moment it is unfrozen; no ``add_param_group``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from lightning_optkit.callbacks.base import LeanCallback
from lightning_optkit.errors import SpecError
from lightning_optkit.param_names import named_parameters, param_names
from lightning_optkit.params import selects
from lightning_optkit.spec import Selector, check_selector


def _point(field_name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"Unfreeze.{field_name}", value, "give an integer >= 0", problem="is not a valid point")
    return value


def _describe(selector: Any) -> str:
    if isinstance(selector, (str, list, tuple, dict)):
        return repr(selector)
    return getattr(selector, "__qualname__", None) or getattr(selector, "__name__", None) or repr(selector)


class Unfreeze(LeanCallback):
    """Set ``requires_grad=True`` on the parameters ``params`` selects, at the start of epoch ``at_epoch``
    or of optimizer step ``at_step`` (``trainer.global_step``); exactly one of the two.

    ``params`` takes the selector forms of :class:`~lightning_optkit.ParamGroup` (glob, ``re:``, ``type:``,
    module class, predicate, list, mapping). Checked when the fit starts: the selector must match a frozen
    parameter, and the optimizers must hold those parameters (the spec needs ``frozen="include"``). The
    unfrozen state is saved in checkpoints and re-applied on resume. Refused (SpecError at setup) under
    multi-process training: DDP syncs only the parameters that required grad when it wrapped the model,
    so unfrozen ones would drift apart per rank.
    """

    def __init__(self, params: Selector, *, at_epoch: int | None = None, at_step: int | None = None) -> None:
        check_selector("Unfreeze.params", params)
        if (at_epoch is None) == (at_step is None):
            raise SpecError("Unfreeze.at_epoch", at_epoch, "give exactly one of at_epoch= or at_step=",
                            problem=f"and at_step={at_step!r} are both {'unset' if at_epoch is None else 'set'}")
        self.params = params
        self.at_epoch = _point("at_epoch", at_epoch)
        self.at_step = _point("at_step", at_step)
        self.unfrozen = False
        self._selected: list[tuple[str, nn.Parameter]] = []

    @property
    def state_key(self) -> str:
        """Unique per selector and point, so several Unfreeze callbacks keep separate checkpoint state."""
        point = f"at_epoch={self.at_epoch}" if self.at_epoch is not None else f"at_step={self.at_step}"
        return f"Unfreeze[params={_describe(self.params)}, {point}]"

    def _select(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        names = param_names(module)  # every name of a parameter, _orig_mod. stripped, as plan() matches them
        return [(n, p) for n, p in named_parameters(module) if selects(self.params, p, names)]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the selector matches frozen parameters of the module."""
        if stage != "fit":
            return
        if trainer.world_size > 1:
            # DDP registers only the parameters that require grad when it wraps the model: gradients of
            # parameters unfrozen later would never be all-reduced, and the ranks would drift apart.
            raise SpecError("Unfreeze", f"{trainer.world_size} processes", "under multi-process training keep the "
                            "parameters trainable from the start and hold them with a ParamGroup lr (or a "
                            "schedule) instead, or fine-tune in two fits",
                            problem="cannot unfreeze parameters after DDP wrapped the model (their gradients "
                            "would not be synchronised)")
        self._selected = self._select(pl_module)
        if not self._selected:
            raise SpecError("Unfreeze.params", _describe(self.params), "check it against the parameter names "
                            "(`optkit plan`)", problem="matches no parameter")
        if not self.unfrozen and all(p.requires_grad for _, p in self._selected):
            raise SpecError("Unfreeze.params", _describe(self.params), "freeze them first (requires_grad_(False)) "
                            "or select the parameters that are frozen", problem="matches only trainable parameters")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the optimizers hold the parameters; on resume past the point, unfreeze them again."""
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [n for n, p in self._selected if id(p) not in held]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise SpecError("frozen", "skip", "set frozen: include on the optimizer spec (OptimizerSpec(..., "
                            "frozen='include')) so it plans the frozen parameters and trains them once unfrozen",
                            problem=f"leaves {shown} out of the optimizer, so Unfreeze would make them trainable "
                            "but nothing would update them")
        if self.unfrozen:  # restored from a checkpoint: Lightning restores weights, not requires_grad
            self._unfreeze()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Unfreeze at the start of epoch ``at_epoch`` (or the first epoch after it)."""
        if self.at_epoch is not None and not self.unfrozen and trainer.current_epoch >= self.at_epoch:
            self._unfreeze()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Unfreeze before optimizer step ``at_step`` (when ``trainer.global_step`` reaches it)."""
        if self.at_step is not None and not self.unfrozen and trainer.global_step >= self.at_step:
            self._unfreeze()

    def _unfreeze(self) -> None:
        for _, p in self._selected:
            p.requires_grad_(True)
        self.unfrozen = True

    def state_dict(self) -> dict[str, Any]:
        """Whether the parameters have been unfrozen (saved in checkpoints)."""
        return {"unfrozen": self.unfrozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the unfrozen flag; the parameters are unfrozen again in ``on_train_start``."""
        self.unfrozen = bool(state_dict.get("unfrozen", False))
