"""Stop training at the first NaN/Inf instead of training on garbage, and say where it appeared."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from das_lab.errors import NonFiniteError


@dataclass
class PendingLoss:
    """A step's loss on its way to the host: a copy queued on the GPU stream right after the forward pass."""

    value: torch.Tensor
    ready: Optional[torch.cuda.Event]
    step: int
    epoch: int

    @classmethod
    def start(cls, loss: torch.Tensor, step: int, epoch: int) -> "PendingLoss":
        loss = loss.detach()
        if not loss.is_cuda:
            return cls(loss, None, step, epoch)
        host = torch.empty(loss.shape, dtype=loss.dtype, pin_memory=True)
        host.copy_(loss, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(host, ready, step, epoch)

    def read(self) -> float:
        """The loss; waits for the forward pass that made it, not for the backward queued after it."""
        if self.ready is not None:
            self.ready.synchronize()
        return float(self.value)


class StopOnNonFiniteLoss(Callback):
    """Raises :class:`NonFiniteError` at the first non-finite training loss, and adds the step, epoch and
    last good checkpoint to one raised inside the step (e.g. by a DAS gate); earlier checkpoints stay.

    A step's loss is copied to the host before its backward pass is queued and read when the next
    step starts, or before validation, a checkpoint or the end of training: reading it at the end of
    its own step would make the host wait for the whole step on the GPU every step. No step runs
    on weights that a non-finite loss produced, and no checkpoint holds them.
    """

    def __init__(self) -> None:
        self._pending: Optional[PendingLoss] = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._pending = PendingLoss.start(loss, trainer.global_step, trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._check(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._pending = None
        if isinstance(exception, NonFiniteError) and exception.step is None:
            self._locate(trainer, exception, trainer.global_step, trainer.current_epoch)

    def _check(self, trainer: L.Trainer) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        value = pending.read()
        if not math.isfinite(value):
            error = NonFiniteError("train/loss", value)
            self._locate(trainer, error, pending.step, pending.epoch)
            raise error

    @staticmethod
    def _locate(trainer: L.Trainer, error: NonFiniteError, step: int, epoch: int) -> None:
        error.step = step
        error.epoch = epoch
        error.last_checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or None
