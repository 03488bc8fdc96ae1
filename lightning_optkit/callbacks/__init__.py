"""Lightning callbacks: clipping, the non-finite step guard, the optimizer monitor, schedule-free mode."""

from lightning_optkit.callbacks.clipping import CLIP_ALGORITHMS, GradientClipping
from lightning_optkit.callbacks.guard import NonFiniteGuard, TooManySkippedSteps
from lightning_optkit.callbacks.monitor import OptimizerMonitor
from lightning_optkit.callbacks.schedulefree import ScheduleFreeMode

__all__ = [
    "CLIP_ALGORITHMS",
    "GradientClipping",
    "NonFiniteGuard",
    "OptimizerMonitor",
    "ScheduleFreeMode",
    "TooManySkippedSteps",
]
