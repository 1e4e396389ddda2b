"""COCO evaluation: ground truth pycocotools accepts, results JSON, AP numbers.

Numbers come from ``faster_coco_eval`` (a C++ port of pycocotools' COCOeval with the same
matching and interpolation rules; the test suite checks equality with pycocotools).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from faster_coco_eval import COCO, COCOeval_faster
from pycocotools import mask as mask_utils

from das_lab.data.coco import prepare_ground_truth

log = logging.getLogger(__name__)

# The first six entries of COCOeval.stats, in order: das-lab's metric name -> the papers' column title.
AP_TITLES: dict[str, str] = {
    "map": "AP",
    "map_50": "AP50",
    "map_75": "AP75",
    "map_small": "APs",
    "map_medium": "APm",
    "map_large": "APl",
}
AP_NAMES: tuple[str, ...] = tuple(AP_TITLES)

Detection = dict[str, Any]


def to_coco_results(
    image_id: int,
    prediction: dict[str, torch.Tensor],
    category_ids: Sequence[int],
    mask_threshold: float = 0.5,
) -> list[Detection]:
    """One image's torchvision detections as COCO result entries with the original category ids.

    ``prediction`` holds ``boxes`` (x1, y1, x2, y2 in original image pixels), ``labels``
    (1..K, 0 is background) and ``scores``, and ``masks`` (N, 1, H, W probabilities) for
    instance segmentation; label ``k`` is category ``category_ids[k - 1]``.
    """
    labels = prediction["labels"].cpu()
    keep = labels >= 1
    boxes = prediction["boxes"].detach().cpu()[keep].tolist()
    scores = prediction["scores"].detach().cpu()[keep].tolist()
    labels = labels[keep].tolist()
    results: list[Detection] = [
        {
            "image_id": int(image_id),
            "category_id": int(category_ids[label - 1]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": score,
        }
        for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores)
    ]
    if "masks" in prediction and results:
        binary = (prediction["masks"].detach()[keep][:, 0] > mask_threshold).cpu().numpy()
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
        for result, rle in zip(results, rles):
            rle["counts"] = rle["counts"].decode("ascii")
            result["segmentation"] = rle
    return results


def evaluate_coco(
    ground_truth: dict[str, Any],
    detections: list[Detection],
    iou_type: str = "bbox",
    image_ids: Optional[Iterable[int]] = None,
) -> dict[str, float]:
    """COCO AP, AP50, AP75, APs, APm, APl (fractions) of ``detections`` on ``image_ids``.

    ``image_ids`` restricts the evaluation to the images that were actually predicted (e.g. with
    ``trainer.limit_val_batches``); ``None`` evaluates every image of the ground truth. An AP
    without ground truth to score (COCOeval's -1, e.g. ``map_large`` when no object is large) is
    undefined: NaN here, null in metrics.json, never 0, which would read as a failed detector.
    """
    coco_gt = COCO(prepare_ground_truth(ground_truth))
    coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=log.debug)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(set(image_ids))
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {name: float(value) if value >= 0 else math.nan for name, value in zip(AP_NAMES, evaluator.stats)}


def gather_detections(detections: list[Detection], image_ids: list[int]) -> tuple[list[Detection], list[int]]:
    """All processes' detections and image ids, each image counted once.

    A distributed sampler pads the last batch by repeating images; the repeats are dropped so
    that no image is scored twice.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return detections, sorted(set(image_ids))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (detections, image_ids))
    seen: set[int] = set()
    merged: list[Detection] = []
    for rank_detections, rank_ids in gathered:
        new_ids = set(rank_ids) - seen
        merged.extend(d for d in rank_detections if d["image_id"] in new_ids)
        seen |= new_ids
    return merged, sorted(seen)
