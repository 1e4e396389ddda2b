"""Stop training at the first NaN/Inf instead of training on garbage, and say where it appeared."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from das_lab.errors import NonFiniteError


class StopOnNonFiniteLoss(Callback):
    """Raises :class:`NonFiniteError` at the first non-finite training loss, and adds the step, epoch and
    last good checkpoint to one raised inside the step (e.g. by a DAS gate); earlier checkpoints stay."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or math.isfinite(float(loss)):
            return
        error = NonFiniteError("train/loss", float(loss))
        self._locate(trainer, error)
        raise error

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteError) and exception.step is None:
            self._locate(trainer, exception)

    @staticmethod
    def _locate(trainer: L.Trainer, error: NonFiniteError) -> None:
        error.step = trainer.global_step
        error.epoch = trainer.current_epoch
        error.last_checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or None
