"""Optimizer and per-step LR schedule from timm factories, shared by every task module."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import nn
from torch.optim import Optimizer

from das_lab.tasks.base import BatchedData, require_data

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[..., Any]


def global_batch_size(trainer: L.Trainer) -> int:
    """Images per optimizer step over all devices: world size x batch size x accumulation."""
    datamodule = require_data(trainer.datamodule, BatchedData, "task.lr_reference_batch")
    return trainer.world_size * datamodule.batch_size * trainer.accumulate_grad_batches


def configure_timm_optimization(
    trainer: L.Trainer,
    net: nn.Module,
    optimizer: OptimizerFactory,
    scheduler: Optional[SchedulerFactory],
    lr_reference_batch: Optional[int],
) -> dict[str, Any]:
    """Build the optimizer (LR linearly scaled to the global batch) and a per-step timm schedule.

    ``optimizer`` is a partial of ``timm.optim.create_optimizer_v2`` and ``scheduler`` one of
    ``timm.scheduler.create_scheduler_v2``; the epoch-based settings of the schedule (warm-up,
    decay milestones) are converted to optimizer steps, and the schedule ends where training
    ends (``max_epochs`` or an earlier ``max_steps``).
    """
    overrides: dict[str, float] = {}
    if lr_reference_batch is not None:
        base_lr = getattr(optimizer, "keywords", {}).get("lr")
        if base_lr is None:
            raise ValueError("task.lr_reference_batch is set but optimizer.lr is missing: set optimizer.lr")
        overrides["lr"] = base_lr * global_batch_size(trainer) / lr_reference_batch
    opt = optimizer(net, **overrides)
    if scheduler is None:
        return {"optimizer": opt}
    total_steps = int(trainer.estimated_stepping_batches)  # also sets up the training data
    batches = trainer.num_training_batches
    if math.isfinite(batches) and batches > 0:
        updates_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
    else:
        updates_per_epoch = max(1, total_steps // max(1, trainer.max_epochs or 1))
    num_epochs = max(1, math.ceil(total_steps / updates_per_epoch))
    settings = getattr(scheduler, "keywords", {})
    if settings.get("warmup_prefix"):  # timm then starts the decay after the warm-up: keep the end in place
        num_epochs = max(1, num_epochs - settings.get("warmup_epochs", 0))
    sched, _ = scheduler(opt, num_epochs=num_epochs, updates_per_epoch=updates_per_epoch, step_on_epochs=False)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


class TimmSchedulerMixin:
    """Lets Lightning step a timm scheduler, which is not a ``torch.optim.lr_scheduler``, and logs its rate."""

    global_step: int

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)

    def log_learning_rate(self) -> None:
        """Log ``train/lr`` (first parameter group) as a CPU tensor.

        Lightning turns a logged Python float into a tensor on the module's device; on a GPU that
        copy waits for every kernel queued so far, in the middle of each training step.
        """
        lr = self.optimizers().param_groups[0]["lr"]
        self.log("train/lr", torch.tensor(lr, dtype=torch.float32), on_step=True, on_epoch=False)
