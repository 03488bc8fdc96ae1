"""Keep schedule-free optimizers in the right mode around validation, testing and checkpoints."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_optkit.callbacks.base import LeanCallback
from lightning_optkit.optim.chained import ChainedOptimizer
from lightning_optkit.optim.schedulefree import ScheduleFreeAdamW


def schedule_free_optimizers(optimizers: list[torch.optim.Optimizer]) -> list[ScheduleFreeAdamW]:
    """Every ScheduleFreeAdamW in ``optimizers``, including members of a ChainedOptimizer."""
    found: list[ScheduleFreeAdamW] = []
    for optimizer in optimizers:
        if isinstance(optimizer, ScheduleFreeAdamW):
            found.append(optimizer)
        elif isinstance(optimizer, ChainedOptimizer):
            found.extend(schedule_free_optimizers(optimizer.optimizers))
    return found


class ScheduleFreeMode(LeanCallback):
    """Switch every ScheduleFreeAdamW of the trainer to eval (weights x) and back to train (weights y).

    Train mode at the start of training and after each validation inside ``fit``; eval mode for
    validation, test, predict and after training ends (so the model you keep holds x). Checkpoints
    always hold x and the optimizer in eval mode, wherever they are saved from (the callback rewrites
    the model and optimizer entries in ``on_save_checkpoint``); on resume, training switches back to y.
    BatchNorm running statistics are not recomputed at x.
    """

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[ScheduleFreeAdamW]:
        return schedule_free_optimizers(list(trainer.optimizers))

    def _set_train(self, trainer: pl.Trainer) -> None:
        for optimizer in self._optimizers(trainer):
            optimizer.train()

    def _set_eval(self, trainer: pl.Trainer) -> None:
        for optimizer in self._optimizers(trainer):
            optimizer.eval()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Parameters to y before the first training step."""
        self._set_train(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Leave the trained model at x."""
        self._set_eval(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate at x."""
        self._set_eval(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Back to y when the validation ran inside fit."""
        if trainer.state.fn == "fit":
            self._set_train(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Test at x."""
        self._set_eval(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Predict at x."""
        self._set_eval(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Rewrite the checkpoint's weights and optimizer states as they are in eval mode (x)."""
        optimizers = self._optimizers(trainer)
        if not any(optimizer.train_mode for optimizer in optimizers):
            return
        was_training = [optimizer.train_mode for optimizer in optimizers]
        self._set_eval(trainer)
        try:
            # state_dict tensors share storage with the parameters: clone them before switching back.
            weights = trainer.strategy.lightning_module_state_dict()
            checkpoint["state_dict"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [
                    trainer.strategy.optimizer_state(optimizer) for optimizer in trainer.optimizers
                ]
        finally:
            for optimizer, training in zip(optimizers, was_training):
                if training:
                    optimizer.train()
