"""What ``das-lab predict`` writes for each task: a CSV of top-k classes, COCO JSON of detections (and the
images with their boxes drawn), label PNGs in the ADE20K release format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.io import write_png
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from das_lab.tasks.coco_metrics import to_coco_results
from das_lab.tasks.detection import DetectionModule
from das_lab.tasks.segmentation import SegmentationModule, write_label_png
from das_lab.tasks.segmentation_overlays import palette
from das_lab.utils.tables import write_csv


class ClassesCSV:
    """Each image's ``topk`` classes with their probabilities, one CSV row per image."""

    def __init__(self, net: nn.Module, names: Sequence[str], topk: int, out: Path) -> None:
        self.net = net
        self.names = list(names)
        self.k = min(topk, len(self.names))
        self.out = out
        self.rows: list[list[str]] = []

    def __call__(self, files: Sequence[Path], images: list[Tensor]) -> None:
        probs, classes = self.net(torch.stack(images)).float().softmax(-1).topk(self.k, dim=-1)
        for path, p_row, c_row in zip(files, probs.tolist(), classes.tolist()):
            self.rows.append([str(path), *(v for c, p in zip(c_row, p_row) for v in (self.names[c], f"{p:.6f}"))])

    def finish(self) -> Path:
        """Write the CSV; its path."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        header = ["file", *(f"{column}_{rank}" for rank in range(1, self.k + 1) for column in ("class", "prob"))]
        write_csv(self.out, header, self.rows)
        return self.out


class DetectionsJSON:
    """Detections as a COCO-format file (images, categories with their names, annotations with scores).

    With ``boxes`` (input file -> PNG path), each image is also saved with its boxes of score >=
    ``box_threshold`` drawn and labelled by class name.
    """

    def __init__(
        self,
        module: DetectionModule,
        names: Sequence[str],
        category_ids: Sequence[int],
        out: Path,
        boxes: Optional[dict[Path, Path]],
        box_threshold: float,
    ) -> None:
        self.module = module
        self.names = dict(zip(category_ids, names))
        self.category_ids = list(category_ids)
        self.out = out
        self.boxes = boxes
        self.box_threshold = box_threshold
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def __call__(self, files: Sequence[Path], images: list[Tensor]) -> None:
        predictions = self.module([F.to_dtype(image, torch.float32, scale=True) for image in images])
        for path, image, prediction in zip(files, images, predictions):
            image_id = len(self.images) + 1
            self.images.append(
                {"id": image_id, "file_name": str(path), "height": image.shape[-2], "width": image.shape[-1]}
            )
            for result in to_coco_results(image_id, prediction, self.category_ids):
                _, _, width, height = result["bbox"]
                self.annotations.append(
                    {
                        "id": len(self.annotations) + 1,
                        **result,
                        "category_name": self.names[result["category_id"]],
                        "area": width * height,
                        "iscrowd": 0,
                    }
                )
            if self.boxes is not None:
                self._draw(image, prediction, self.boxes[path])

    def _draw(self, image: Tensor, prediction: dict[str, Tensor], path: Path) -> None:
        keep = (prediction["scores"] >= self.box_threshold) & (prediction["labels"] >= 1)
        labels, scores = prediction["labels"][keep].tolist(), prediction["scores"][keep].tolist()
        colours = palette(len(self.category_ids))
        drawn = draw_bounding_boxes(
            image.cpu(),
            prediction["boxes"][keep].cpu(),
            labels=[f"{self.names[self.category_ids[k - 1]]} {s:.2f}" for k, s in zip(labels, scores)],
            colors=[colours[k - 1] for k in labels],
            width=2,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(drawn, str(path))

    def finish(self) -> Path:
        """Write the JSON; its path."""
        categories = [{"id": category_id, "name": self.names[category_id]} for category_id in self.category_ids]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(
            json.dumps({"images": self.images, "categories": categories, "annotations": self.annotations})
        )
        return self.out


class LabelPNGs:
    """Each image's predicted classes as a label PNG (``labels``: input file -> PNG path) in the ADE20K release
    format, written as ``das-lab eval`` writes them, at the image's own size; ``classes.csv`` names the values."""

    def __init__(
        self, module: SegmentationModule, names: Sequence[str], out_dir: Path, labels: dict[Path, Path]
    ) -> None:
        self.module = module
        self.names = list(names)
        self.out_dir = out_dir
        self.labels = labels

    def __call__(self, files: Sequence[Path], images: list[Tensor]) -> None:
        for path, image in zip(files, images):
            write_label_png(self.module.predict_probabilities(image).argmax(dim=0), self.labels[path])

    def finish(self) -> Path:
        """Write classes.csv (label value, class name); the folder of PNGs."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(
            self.out_dir / "classes.csv", ["label", "class"], ((i + 1, name) for i, name in enumerate(self.names))
        )
        return self.out_dir
