"""Semantic segmentation (UperNet, Semantic FPN) on any timm backbone, scored as mmsegmentation scores it.

The backbone's stride 4, 8, 16 and 32 maps come through timm's feature API: a model config's
network is wrapped in timm's ``FeatureGetterNet`` (what ``features_only=True`` builds; it reads
``forward_intermediates`` and prunes the unused head), and a network already built with
``features_only=True`` is used as it is. Training is iteration-based: the scheduler's ``*_epochs``
keys count optimizer steps here, as mmseg's iteration schedules do.

Evaluation (``whole`` or ``slide`` inference) rescales each image, keeping its aspect ratio, to
``test_scale`` x each ``tta_scales`` ratio (and its mirror image with ``flip``), averages the
softmax probabilities at the image's own size and takes the arg-max. Outside fitting it also writes
every prediction as a release-format PNG (uint8, class k as k + 1) in
``<trainer.default_root_dir>/predictions_<stage>/`` and the per-class scores in
``<trainer.default_root_dir>/per_class_<stage>.csv``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from timm.models._features import FeatureGetterNet, FeatureInfo
from torch import nn
from torch.nn import functional as F
from torchvision.io import write_png

from das_lab.data.ade20k import rescale_size
from das_lab.models.fpn_backbone import stage_levels
from das_lab.tasks.base import MetricSpec, NamedClasses, require_data
from das_lab.tasks.optimization import (
    OptimizerFactory,
    SchedulerFactory,
    TimmSchedulerMixin,
    configure_timm_optimization,
)
from das_lab.tasks.segmentation_heads import FCNHead, SemanticFPNHead, UPerHead, resize
from das_lab.tasks.segmentation_metrics import SegmentationScores
from das_lab.utils.tables import write_csv

log = logging.getLogger(__name__)

HEADS = ("upernet", "fpn")
INFERENCE = ("whole", "slide")
METRICS = (
    MetricSpec("loss", "min", "value", "loss", ("train",)),
    MetricSpec("miou", "max", "fraction", "mIoU", headline=True),
    MetricSpec("macc", "max", "fraction", "mAcc"),
    MetricSpec("aacc", "max", "fraction", "aAcc"),
)


def feature_backbone(net: nn.Module) -> nn.Module:
    """``net`` as a timm features-only model returning its stride 4-32 maps (finest first)."""
    if isinstance(getattr(net, "feature_info", None), FeatureInfo):
        return net
    if not hasattr(net, "forward_intermediates") or not hasattr(net, "feature_info"):
        raise TypeError(
            f"{type(net).__name__} has no forward_intermediates/feature_info: segmentation takes multi-scale maps "
            "through timm's feature API; use a timm model (model=timm model.name=<name>) or a das-lab model"
        )
    return FeatureGetterNet(net, out_indices=stage_levels(net), output_fmt="NCHW")


def write_label_png(prediction: torch.Tensor, path: Path) -> None:
    """A (H, W) map of class indices as a label PNG in the ADE20K release format: uint8, class k as k + 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png((prediction + 1).to(torch.uint8, copy=True).cpu()[None], str(path))


class Segmentor(nn.Module):
    """Backbone maps -> decode head (and the auxiliary head while training) -> logits at the input's size."""

    def __init__(self, backbone: nn.Module, head: nn.Module, aux_head: Optional[nn.Module], aux_level: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.aux_level = aux_level

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decode and auxiliary logits, both resized to the input."""
        features = self.backbone(x)
        logits = resize(self.head(features), x.shape[-2:])
        aux = None if self.aux_head is None else resize(self.aux_head(features[self.aux_level]), x.shape[-2:])
        return logits, aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize(self.head(self.backbone(x)), x.shape[-2:])


class SegmentationModule(TimmSchedulerMixin, L.LightningModule):
    """Trains a UperNet or Semantic FPN segmentor and logs ``{stage}/miou``, ``macc``, ``aacc`` (fractions).

    The loss is mmseg 0.x's cross-entropy: averaged over all pixels of the crop, ignored ones
    counting 0; with ``aux_weight`` > 0 (UperNet), plus that weight x the auxiliary head's loss.
    """

    metric_specs = METRICS

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: Optional[SchedulerFactory] = None,
        head: str = "upernet",
        num_classes: int = 150,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        neck_channels: int = 256,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        dropout: float = 0.1,
        norm: str = "batch",
        ignore_index: int = 255,
        test_scale: Sequence[int] = (2048, 512),
        tta_scales: Sequence[float] = (1.0,),
        flip: bool = False,
        inference: str = "whole",
        crop_size: int = 512,
        stride: int = 341,
        size_divisor: int = 32,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"task.head={head!r}: expected one of {HEADS}")
        if inference not in INFERENCE:
            raise ValueError(f"task.inference={inference!r}: expected one of {INFERENCE}")
        if num_classes < 1 or channels < 1 or aux_weight < 0:
            raise ValueError(
                f"task.num_classes={num_classes}, task.channels={channels}, task.aux_weight={aux_weight}: "
                "expected positive class and channel counts and a weight >= 0"
            )
        if not tta_scales or min(tta_scales) <= 0 or not 0 < stride <= crop_size:
            raise ValueError(
                f"task.tta_scales={list(tta_scales)}, task.stride={stride}, task.crop_size={crop_size}: "
                "expected positive ratios and 0 < stride <= crop_size"
            )
        backbone = feature_backbone(net)
        in_channels, strides = backbone.feature_info.channels(), backbone.feature_info.reduction()
        if head == "upernet":
            decode: nn.Module = UPerHead(in_channels, channels, num_classes, pool_scales, dropout, norm)
        else:
            decode = SemanticFPNHead(in_channels, strides, neck_channels, channels, num_classes, dropout, norm)
        aux_level = len(in_channels) - 2
        aux = FCNHead(in_channels[aux_level], aux_channels, num_classes, 1, dropout, norm) if aux_weight > 0 else None
        self.segmentor = Segmentor(backbone, decode, aux, aux_level)
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.test_scale = tuple(test_scale)
        self.tta_scales = tuple(tta_scales)
        self.flip = flip
        self.inference = inference
        self.crop_size = crop_size
        self.stride = stride
        self.size_divisor = size_divisor
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scores = nn.ModuleDict({stage: SegmentationScores(num_classes, ignore_index) for stage in ("val", "test")})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmentor(images)

    def cost_network(self) -> nn.Module:
        """The whole segmentor: its parameters with the auxiliary head, as mmseg's papers count them."""
        return self.segmentor

    def cost_input_size(self) -> tuple[int, int]:
        """(height, width) of the test scale, 512 x 2048 by default: the image the papers count GFLOPs on."""
        long, short = self.test_scale
        return short, long

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="none").mean()

    def training_step(
        self, batch: tuple[list[torch.Tensor], list[torch.Tensor], list[str]], batch_idx: int
    ) -> torch.Tensor:
        images, labels = torch.stack(batch[0]), torch.stack(batch[1])
        logits, aux = self.segmentor.forward_train(images)
        decode_loss = self._loss(logits, labels)
        loss = decode_loss
        size = len(images)
        if aux is not None:
            aux_loss = self._loss(aux, labels)
            loss = loss + self.aux_weight * aux_loss
            self.log("train/loss_aux", aux_loss, on_step=True, on_epoch=False, batch_size=size)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train/loss_decode", decode_loss, on_step=True, on_epoch=False, batch_size=size)
        self.log_learning_rate()
        return loss

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a (1, 3, H, W) input, padded at the bottom/right to a multiple of ``size_divisor``."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.size_divisor, -width % self.size_divisor
        logits = self.segmentor(F.pad(x, (0, pad_w, 0, pad_h)))
        return logits[..., :height, :width]

    def _slide(self, x: torch.Tensor) -> torch.Tensor:
        """mmseg's sliding window: ``crop_size`` windows every ``stride`` pixels, overlapping logits averaged."""
        height, width = x.shape[-2:]
        logits = x.new_zeros(1, self.num_classes, height, width)
        count = x.new_zeros(1, 1, height, width)
        rows = max(height - self.crop_size + self.stride - 1, 0) // self.stride + 1
        cols = max(width - self.crop_size + self.stride - 1, 0) // self.stride + 1
        for row in range(rows):
            for col in range(cols):
                bottom = min(row * self.stride + self.crop_size, height)
                right = min(col * self.stride + self.crop_size, width)
                top, left = max(bottom - self.crop_size, 0), max(right - self.crop_size, 0)
                logits[..., top:bottom, left:right] += self._whole(x[..., top:bottom, left:right])
                count[..., top:bottom, left:right] += 1
        return logits / count

    def predict_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities (C, H, W) of one normalised (3, H, W) image, at its own size, over all TTA views."""
        height, width = image.shape[-2:]
        infer = self._whole if self.inference == "whole" else self._slide
        total = image.new_zeros(self.num_classes, height, width)
        views = 0
        for ratio in self.tta_scales:
            scaled = resize(image[None], rescale_size(height, width, self.test_scale, ratio))
            for mirrored in (False, True) if self.flip else (False,):
                logits = infer(scaled.flip(-1) if mirrored else scaled)
                logits = logits.flip(-1) if mirrored else logits
                total += resize(logits, (height, width))[0].softmax(dim=0)
                views += 1
        return total / views

    def _evaluate(self, batch: tuple[list[torch.Tensor], list[torch.Tensor], list[str]], stage: str) -> None:
        writing = self.trainer.state.fn != TrainerFn.FITTING
        folder = Path(self.trainer.default_root_dir) / f"predictions_{stage}"
        for image, label, name in zip(*batch):
            prediction = self.predict_probabilities(image).argmax(dim=0)
            self.scores[stage].update(prediction, label)
            if writing:
                write_label_png(prediction, folder / f"{name}.png")

    def _log_epoch(self, stage: str) -> None:
        scores = self.scores[stage].compute()
        self.scores[stage].reset()
        evaluated = [spec for spec in self.metric_specs if stage in spec.stages]
        self.log_dict({spec.key(stage): scores[spec.name] for spec in evaluated}, prog_bar=True)
        if self.trainer.state.fn != TrainerFn.FITTING and self.trainer.is_global_zero:
            self._write_per_class(stage, scores)

    def _write_per_class(self, stage: str, scores: dict[str, torch.Tensor]) -> None:
        datamodule = self.trainer.datamodule
        names = list(require_data(datamodule, NamedClasses, "task=segmentation").class_names) if datamodule else []
        names = names or [str(k) for k in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(
                f"task.num_classes={self.num_classes} but the data names {len(names)} classes; "
                "set task.num_classes=${data.num_classes}"
            )
        path = Path(self.trainer.default_root_dir) / f"per_class_{stage}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        ious, accs = (scores[key].tolist() for key in ("iou", "acc"))  # NaN: no pixel of the class
        write_csv(
            path,
            ["label", "class", "iou", "acc"],
            (
                [index + 1, name, *(None if math.isnan(v) else f"{v:.6f}" for v in (iou, acc))]
                for index, (name, iou, acc) in enumerate(zip(names, ious, accs))
            ),
        )
        log.info("per-class IoU written to %s; predictions in %s", path, path.parent / f"predictions_{stage}")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> dict[str, Any]:
        config = configure_timm_optimization(self.trainer, self.segmentor, self.optimizer_factory, None, None)
        if self.scheduler_factory is None:
            return config
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler, _ = self.scheduler_factory(
            config["optimizer"], num_epochs=total_steps, updates_per_epoch=1, step_on_epochs=False
        )
        return {**config, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
