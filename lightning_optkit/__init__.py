"""lightning_optkit: personalise torch.optim in PyTorch Lightning, short, safe and fast."""

from lightning_optkit.build import build_optimizers
from lightning_optkit.errors import SpecError
from lightning_optkit.mixin import OptimizerMixin
from lightning_optkit.params import plan
from lightning_optkit.registry import OptimizerInfo, list_optimizers, optimizer_info, register_optimizer
from lightning_optkit.schedules import Schedule, register_schedule
from lightning_optkit.spec import ChainSpec, OptimizerSpec, ParamGroup

__version__ = "0.1.0"

__all__ = [
    "ChainSpec",
    "OptimizerInfo",
    "OptimizerMixin",
    "OptimizerSpec",
    "ParamGroup",
    "SpecError",
    "build_optimizers",
    "list_optimizers",
    "optimizer_info",
    "plan",
    "register_optimizer",
    "register_schedule",
    "Schedule",
]
