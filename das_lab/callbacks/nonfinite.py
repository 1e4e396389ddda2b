"""Stop training at the first NaN/Inf loss instead of training on garbage."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class NonFiniteLossError(FloatingPointError):
    """The training loss stopped being a finite number."""


class StopOnNonFiniteLoss(Callback):
    """Raises a clear error at the first non-finite training loss; earlier checkpoints stay as they are."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or math.isfinite(float(loss)):
            return
        checkpoint = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") or "none yet"
        raise NonFiniteLossError(
            f"train/loss became {float(loss)} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"training stopped, last good checkpoint: {last}. Lower optimizer.lr, set "
            f"trainer.gradient_clip_val, or check the data for NaN/Inf values"
        )
