"""Image classification as a LightningModule: loss, top-1/top-5, optimizer and schedule."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from das_lab.tasks.base import MetricSpec
from das_lab.tasks.optimization import (
    OptimizerFactory,
    SchedulerFactory,
    TimmSchedulerMixin,
    configure_timm_optimization,
)
from das_lab.tasks.speed import apply_speed_options


class ClassificationModule(TimmSchedulerMixin, L.LightningModule):
    """Trains any backbone whose ``forward`` returns logits of ``net.num_classes`` classes.

    ``mixup`` (a ``timm.data.Mixup``) mixes training batches and switches the loss to soft-target
    cross-entropy (the Mixup object carries its own label smoothing); otherwise the loss is
    cross-entropy with ``label_smoothing``. Metrics are logged as ``{stage}/loss``,
    ``{stage}/acc1`` and ``{stage}/acc5`` (fractions).
    """

    metric_specs = (
        MetricSpec("loss", "min", "value", "loss", ("train", "val", "test")),
        MetricSpec("acc1", "max", "fraction", "top-1 accuracy", headline=True),
        MetricSpec("acc5", "max", "fraction", "top-5 accuracy"),
    )

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: Optional[SchedulerFactory] = None,
        label_smoothing: float = 0.0,
        mixup: Optional[Any] = None,
        lr_reference_batch: Optional[int] = None,
        compile: bool = False,
        channels_last: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing={label_smoothing}: expected a value in [0, 1)")
        num_classes = getattr(net, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"{type(net).__name__}.num_classes={num_classes!r}: a classification network needs at least "
                "2 classes; set model.num_classes (usually ${data.num_classes})"
            )
        self.net = apply_speed_options(net, compile, channels_last, compile_backend)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.mixup = mixup
        self.lr_reference_batch = lr_reference_batch
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.mixup_criterion = SoftTargetCrossEntropy()
        top_k = min(5, num_classes)
        metrics = MetricCollection(
            {
                "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
            }
        )
        self.metrics = nn.ModuleDict({stage: metrics.clone(prefix=f"{stage}/") for stage in ("val", "test")})
        self.losses = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, soft_targets = self.mixup(images, targets)
            loss = self.mixup_criterion(self(images), soft_targets)
        else:
            loss = self.criterion(self(images), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        self.log_learning_rate()
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, targets = batch
        logits = self(images)
        self.losses[stage].update(self.criterion(logits, targets), weight=len(images))
        self.metrics[stage].update(logits, targets)

    def _log_epoch(self, stage: str) -> None:
        self.log(f"{stage}/loss", self.losses[stage].compute(), prog_bar=True)
        self.log_dict(self.metrics[stage].compute(), prog_bar=True)
        self.losses[stage].reset()
        self.metrics[stage].reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_timm_optimization(
            self.trainer, self.net, self.optimizer_factory, self.scheduler_factory, self.lr_reference_batch
        )
