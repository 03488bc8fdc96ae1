"""How the callbacks name optimizers and their param groups in metric keys and messages."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_optkit.labels import unique_labels
from lightning_optkit.unwrap import raw_optimizer


def optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    """Position of ``optimizer`` (raw or LightningOptimizer-wrapped) in ``trainer.optimizers``."""
    raw = raw_optimizer(optimizer)
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
    return unique_labels([_label_of(raw_optimizer(opt)) for opt in trainer.optimizers])


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

    raw = raw_optimizer(optimizer)
    if not isinstance(raw, ChainedOptimizer):
        return _own_group_names(raw)
    members = unique_labels([_label_of(member) for member in raw.optimizers])
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
