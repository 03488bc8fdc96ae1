"""Lightning callbacks: clipping, the non-finite step guard, the optimizer monitor, schedule-free mode,
unfreezing, and exact mid-epoch resume of the train loader."""

from lightning_optkit.callbacks.clipping import CLIP_ALGORITHMS, GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard, TooManySkippedSteps
from lightning_optkit.callbacks.loader_position import RestoreLoaderPosition
from lightning_optkit.callbacks.monitor import OptimizerMonitor
from lightning_optkit.callbacks.plateau_check import PlateauMonitorCheck
from lightning_optkit.callbacks.schedulefree import ScheduleFreeMode
from lightning_optkit.callbacks.unfreeze import Unfreeze

__all__ = [
    "CLIP_ALGORITHMS",
    "GradientClipping",
    "NonFiniteGuard",
    "OptimizerMonitor",
    "PlateauMonitorCheck",
    "RestoreLoaderPosition",
    "ScheduleFreeMode",
    "TooManySkippedSteps",
    "Unfreeze",
]
