"""Object detection and instance segmentation on COCO-format data as a LightningModule.

The torchvision detectors (Faster R-CNN, RetinaNet, Mask R-CNN) run on an FPN over any das-lab
backbone (``das_lab.models.fpn_backbone``). Their ``GeneralizedRCNNTransform`` resizes
(``min_size``/``max_size``) and normalises (``image_mean``/``image_std``) the [0, 1] images the
datamodule delivers, and maps predictions back to original image pixels for evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from das_lab.models.fpn_backbone import FPNBackbone, check_backbone_contract, freeze_batch_norm, freeze_stages
from das_lab.models.weights import LoadReport, WeightsMismatchError, load_weights
from das_lab.tasks.base import DetectionData, MetricSpec, require_data
from das_lab.tasks.coco_metrics import AP_TITLES, Detection, evaluate_coco, gather_detections, to_coco_results
from das_lab.tasks.optimization import (
    OptimizerFactory,
    SchedulerFactory,
    TimmSchedulerMixin,
    configure_timm_optimization,
)
from das_lab.tasks.speed import apply_speed_options

log = logging.getLogger(__name__)

DETECTORS = ("faster_rcnn", "retinanet", "mask_rcnn")
# box AP under its COCO name; Mask R-CNN logs the mask AP as well, under mask_<name>
METRICS = (
    MetricSpec("loss", "min", "value", "loss", ("train",)),
    *(MetricSpec(name, "max", "fraction", f"box {title}", headline=name == "map") for name, title in AP_TITLES.items()),
    *(MetricSpec(f"mask_{name}", "max", "fraction", f"mask {title}") for name, title in AP_TITLES.items()),
)


def load_backbone_weights(net: nn.Module, path: str) -> LoadReport:
    """Load classification weights into the backbone: every backbone tensor must be in the file.

    Accepts what ``das_lab.models.weights`` reads (das-lab ``.ckpt`` with ``net.`` keys, plain
    state_dicts); file entries the backbone lacks (the classification head) are ignored.
    """
    report = load_weights(net, path, strict=False)
    if report.missing or report.mismatched:
        raise WeightsMismatchError(report)
    return report


def drop_classifier(net: nn.Module) -> None:
    """Detection uses the stage maps only: remove a classification head so it has no idle weights."""
    if getattr(net, "num_classes", 0) == 0:
        return
    if not hasattr(net, "reset_classifier"):
        raise ValueError(
            f"{type(net).__name__} has a {net.num_classes}-class head that detection does not use; "
            "set model.num_classes=0"
        )
    net.reset_classifier(0)


def build_detector(
    backbone: nn.Module,
    detector: str,
    num_classes: int,
    frozen_stages: int,
    frozen_bn: bool,
    fpn_channels: int,
    box_head_dim: int,
    **transform_kwargs: Any,
) -> nn.Module:
    """A torchvision detector with ``num_classes`` foreground classes on an FPN over ``backbone``.

    Anchors follow torchvision's COCO settings, scaled to the FPN strides: one size of 8x the
    stride for the R-CNNs (32..512 on strides 4..64), three octave scales from 4x the stride for
    RetinaNet (32..512 on strides 8..128), aspect ratios 0.5, 1, 2. ``box_head_dim`` is the width
    of the R-CNN box head's two fully connected layers (1024 in torchvision and the papers).
    """
    if detector not in DETECTORS:
        raise ValueError(f"task.detector={detector!r}: expected one of {DETECTORS}")
    if frozen_bn:
        freeze_batch_norm(backbone)
    freeze_stages(backbone, frozen_stages)
    if detector == "retinanet":
        fpn = FPNBackbone(backbone, returned_stages=(2, 3, 4), out_channels=fpn_channels, extra_block="p6p7")
        sizes = tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in fpn.strides)
    else:
        fpn = FPNBackbone(backbone, returned_stages=(1, 2, 3, 4), out_channels=fpn_channels, extra_block="maxpool")
        sizes = tuple((8 * s,) for s in fpn.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    # torchvision's heads treat label 0 as background, so the classifiers get K + 1 outputs.
    if detector == "retinanet":
        return RetinaNet(fpn, num_classes + 1, anchor_generator=anchors, detections_per_img=100, **transform_kwargs)
    levels = [str(i) for i in range(len(fpn.returned_stages))]
    rcnn: dict[str, Any] = dict(
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        **transform_kwargs,
    )
    if detector == "faster_rcnn":
        return FasterRCNN(fpn, **rcnn)
    # torchvision's mask head (four 3x3 convolutions and a deconvolution), as wide as the FPN.
    return MaskRCNN(
        fpn,
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1),
        **rcnn,
    )


class DetectionModule(TimmSchedulerMixin, L.LightningModule):
    """Trains a torchvision detector on a das-lab backbone and scores it with COCO AP.

    Logs ``train/loss`` and its parts ``train/loss_*``; ``{stage}/map``, ``map_50``, ``map_75``,
    ``map_small|medium|large`` (fractions) and, for Mask R-CNN, the same under ``{stage}/mask_``.
    Outside fitting (``trainer.validate``/``test``), the detections are also written as a COCO
    results file, ``<trainer.default_root_dir>/detections_<stage>.json``.
    """

    metric_specs = METRICS

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: Optional[SchedulerFactory] = None,
        detector: str = "faster_rcnn",
        num_classes: int = 80,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        fpn_channels: int = 256,
        box_head_dim: int = 1024,
        frozen_stages: int = 1,
        frozen_bn: bool = True,
        backbone_checkpoint: Optional[str] = None,
        lr_reference_batch: Optional[int] = None,
        compile: bool = False,
        channels_last: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"task.num_classes={num_classes}: expected the number of object categories (>= 1)")
        sizes = (min_size,) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
        if not sizes or not all(0 < s <= max_size for s in sizes):
            raise ValueError(
                f"task.min_size={min_size}, task.max_size={max_size}: expected shorter-side sizes in (0, max_size]"
            )
        check_backbone_contract(net)
        drop_classifier(net)
        if backbone_checkpoint is not None:
            load_backbone_weights(net, backbone_checkpoint)
        self.detector_name = detector
        self.num_classes = num_classes
        self.detector = build_detector(
            net,
            detector,
            num_classes,
            frozen_stages,
            frozen_bn,
            fpn_channels,
            box_head_dim,
            min_size=sizes,
            max_size=max_size,
            image_mean=list(image_mean),
            image_std=list(image_std),
        )
        # backbone + FPN; the detection heads stay eager
        apply_speed_options(self.detector.backbone, compile, channels_last, compile_backend)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr_reference_batch = lr_reference_batch
        self._detections: list[Detection] = []
        self._image_ids: list[int] = []
        self._seen: set[int] = set()

    @property
    def iou_types(self) -> tuple[str, ...]:
        """The COCO evaluations this detector's outputs allow."""
        return ("bbox", "segm") if self.detector_name == "mask_rcnn" else ("bbox",)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.detector(images)

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.detector(images, targets)
        loss = sum(losses.values())
        size = len(images)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in losses.items():
            key = name if name.startswith("loss_") else f"loss_{name}"
            self.log(f"train/{key}", value, on_step=True, on_epoch=True, batch_size=size)
        self.log_learning_rate()
        return loss

    def _data(self) -> DetectionData:
        """The trainer's datamodule, which must provide what detection reads (e.g. data=coco)."""
        return require_data(self.trainer.datamodule, DetectionData, "task=detection")

    def setup(self, stage: str) -> None:
        self._data()

    def _category_ids(self) -> list[int]:
        category_ids = self._data().category_ids
        if not category_ids:
            raise RuntimeError(f"{type(self.trainer.datamodule).__name__}.category_ids is empty: set up its data first")
        if len(category_ids) != self.num_classes:
            raise ValueError(
                f"task.num_classes={self.num_classes} but the data has {len(category_ids)} categories; "
                "set task.num_classes=${data.num_classes}"
            )
        return category_ids

    def _predict(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]]) -> None:
        images, targets = batch
        category_ids = self._category_ids()
        for target, prediction in zip(targets, self.detector(images)):
            image_id = int(target["image_id"])
            if image_id in self._seen:
                continue
            self._seen.add(image_id)
            self._image_ids.append(image_id)
            self._detections.extend(to_coco_results(image_id, prediction, category_ids))

    def _evaluate(self, stage: str) -> None:
        detections, image_ids = gather_detections(self._detections, self._image_ids)
        self._reset()
        ground_truth = self._data().ground_truth(stage)
        for iou_type in self.iou_types:
            prefix = f"{stage}/" if iou_type == "bbox" else f"{stage}/mask_"
            scores = evaluate_coco(ground_truth, detections, iou_type, image_ids)
            self.log_dict({f"{prefix}{name}": value for name, value in scores.items()}, prog_bar=iou_type == "bbox")
        if self.trainer.state.fn != TrainerFn.FITTING and self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / f"detections_{stage}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(detections))
            log.info("%d detections on %d images written to %s", len(detections), len(image_ids), path)

    def on_fit_start(self) -> None:
        if self.detector_name == "mask_rcnn" and not self._data().with_masks:
            raise ValueError("task.detector=mask_rcnn trains on instance masks: set data.with_masks=true")

    def _reset(self) -> None:
        self._detections, self._image_ids, self._seen = [], [], set()

    def on_validation_epoch_start(self) -> None:
        self._reset()

    def validation_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> None:
        self._predict(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_start(self) -> None:
        self._reset()

    def test_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> None:
        self._predict(batch)

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_timm_optimization(
            self.trainer, self.detector, self.optimizer_factory, self.scheduler_factory, self.lr_reference_batch
        )
