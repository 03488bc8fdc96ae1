"""Kit optimizers: a small base class and the optimizers written on it."""

from lightning_optkit.optim.adan import Adan
from lightning_optkit.optim.base import KitOptimizer
from lightning_optkit.optim.chained import ChainedOptimizer
from lightning_optkit.optim.fused_adamw import FusedAdamW
from lightning_optkit.optim.lamb import LAMB
from lightning_optkit.optim.lion import Lion
from lightning_optkit.optim.modifiers import AcceptsStepModifiers, StepModifiers
from lightning_optkit.optim.momentum_sgd import MomentumSGD
from lightning_optkit.optim.schedulefree import ScheduleFreeAdamW

__all__ = [
    "LAMB",
    "AcceptsStepModifiers",
    "Adan",
    "ChainedOptimizer",
    "FusedAdamW",
    "KitOptimizer",
    "Lion",
    "MomentumSGD",
    "ScheduleFreeAdamW",
    "StepModifiers",
]
