"""Every private torch / Lightning internal the kit relies on, with why there is no public route.

The accessors below are the only places the package reads these attributes; when a torch or
Lightning release changes one, this module is where it breaks. Two kinds live elsewhere, each
isolated in one module: the private multi-tensor ops (``torch._foreach_*``, ``torch._fused_adamw_``,
``torch._fused_sgd_``: :mod:`lightning_optkit.kernels.torch_fused`, and ``torch._foreach_add_`` /
``torch._foreach_norm`` in :mod:`lightning_optkit.kernels.triton.adamw` and
:mod:`lightning_optkit.distributed.overlap`: torch has no public multi-tensor API), and W&B's
``wandb_internal_pb2`` record format (:mod:`lightning_optkit.wandb_history`: the only reader of an
offline run file). :class:`~lightning_optkit.callbacks.base.LeanCallback` relies on a behaviour, not an
attribute: Lightning's hook dispatcher skips a hook attribute that is not callable.
"""

from __future__ import annotations

from typing import Any

import torch


def tensor_version(t: torch.Tensor) -> int:
    """``Tensor._version``: counts in-place writes (no public equivalent); tells a re-written tensor apart."""
    return t._version


def batches_that_stepped(trainer: Any) -> int | None:
    """``fit_loop.epoch_loop._batches_that_stepped``: the step Lightning's own logging uses (batches that
    stepped, once per batch whatever the number of optimizers); ``trainer.global_step`` counts every
    optimizer's steps. None when the loop has no such counter."""
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return None if stepped is None else int(stepped)


def scaler_optimizer_state(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``GradScaler._per_optimizer_states[id(optimizer)]``: its unscale stage (``unscale_`` raises when
    called twice) and per-device ``found_inf`` tensors (the only way to make ``scaler.step`` skip)."""
    return scaler._per_optimizer_states[id(optimizer)]


def module_trainer(module: Any) -> Any:
    """``LightningModule._trainer``: the Trainer or None (``module.trainer`` raises outside a fit, and
    ``configure_optimizers`` may be called on a bare module)."""
    return getattr(module, "_trainer", None)


def load_pending_loader_states(fit_loop: Any) -> bool:
    """Load the checkpoint's train-loader states Lightning left pending and restart its data fetcher.

    ``_combined_loader_states_to_load``, ``_load_combined_loader_states`` and ``_data_fetcher`` are what
    the fit loop's own ``setup_data`` uses; Lightning has no public API for either step (issue #20550).
    Returns whether anything was restored.
    """
    if not getattr(fit_loop, "_combined_loader_states_to_load", None) or fit_loop._data_fetcher is None:
        return False
    fit_loop._load_combined_loader_states()
    iter(fit_loop._data_fetcher)  # a new iterator (and prefetched batch) from the restored position
    return True


def dtensor_global_offset(p: Any) -> tuple[int, ...]:
    """``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``: where this rank's shard of
    a DTensor starts in the whole tensor, for any mesh and placements (DTensor has no public accessor);
    lean state keys its rounding noise by the element's index in the whole parameter."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(offset)
