"""The torch optimizer behind Lightning's ``LightningOptimizer`` wrapper."""

from __future__ import annotations

from typing import Any

import torch


def raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """``optimizer`` itself, or the torch optimizer a LightningOptimizer wraps (its ``optimizer``).

    Lightning hands callbacks and ``self.optimizers()`` the wrapper; state, param groups and the kit's
    step modifiers live on the optimizer inside. The one place the kit unwraps it.
    """
    return getattr(optimizer, "optimizer", optimizer)
