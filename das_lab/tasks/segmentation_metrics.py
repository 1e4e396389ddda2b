"""mIoU, mAcc and aAcc exactly as mmsegmentation computes them, as a DDP-correct torchmetrics Metric.

Per class, the intersection (pixels predicted c and labelled c), union (predicted c or labelled c)
and labelled area are summed over the whole split (summed again across processes), then:
IoU_c = intersection / union and Acc_c = intersection / labelled area, each left out of its mean
where the denominator is 0; aAcc = all intersections / all labelled pixels. Pixels labelled
``ignore_index`` count nowhere.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class SegmentationScores(Metric):
    """Accumulates per-class pixel counts; ``compute`` returns miou, macc, aacc and the per-class iou/acc."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: expected the number of classes (>= 1)")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        for name in ("intersection", "union", "label_area"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of predicted class maps and label maps of the same shape."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        prediction, target = prediction[valid].long(), target[valid].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(
                f"target holds {int(target.max())}; expected 0..{self.num_classes - 1} or {self.ignore_index}"
            )
        intersection = self._count(prediction[prediction == target])
        predicted, labelled = self._count(prediction), self._count(target)
        self.intersection += intersection
        self.union += predicted + labelled - intersection
        self.label_area += labelled

    def _count(self, values: torch.Tensor) -> torch.Tensor:
        return torch.bincount(values, minlength=self.num_classes).double()

    def compute(self) -> dict[str, torch.Tensor]:
        iou = self.intersection / self.union  # nan where the union is empty
        acc = self.intersection / self.label_area
        return {
            "miou": iou.nanmean(),
            "macc": acc.nanmean(),
            "aacc": self.intersection.sum() / self.label_area.sum(),
            "iou": iou,
            "acc": acc,
        }
