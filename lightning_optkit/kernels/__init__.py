"""Fused multi-tensor update kernels (Triton on CUDA, torch's fused/foreach kernels elsewhere).

Public steps (one kernel launch per (device, dtype) group, no host sync): :func:`adamw_step`,
:func:`sgd_momentum_step`, :func:`lion_step`, :func:`grad_norm`, :func:`grad_sum_of_squares`; KitOptimizer hooks
:func:`momentum_sgd_fused_step` and :func:`lion_fused_step`.
"""

from lightning_optkit.kernels.dispatch import BACKEND_ENV, select_backend
from lightning_optkit.kernels.functional import (
    adamw_step,
    grad_norm,
    grad_sum_of_squares,
    lion_step,
    sgd_momentum_step,
)
from lightning_optkit.kernels.hooks import lion_fused_step, momentum_sgd_fused_step

__all__ = [
    "BACKEND_ENV",
    "adamw_step",
    "grad_norm",
    "grad_sum_of_squares",
    "lion_fused_step",
    "lion_step",
    "momentum_sgd_fused_step",
    "select_backend",
    "sgd_momentum_step",
]
