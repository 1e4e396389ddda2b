"""COCO evaluation helpers: ground truth fixes, results format, and AP equal to pycocotools'."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from das_lab.run import MetricHistory, RunRecord
from das_lab.tasks.base import MetricSpec, metric_declarations
from das_lab.tasks.coco_metrics import AP_NAMES, evaluate_coco, prepare_ground_truth, to_coco_results
from das_lab.tasks.detection import DetectionModule
from fake_coco import make_split


def _pycocotools_stats(ground_truth: dict, detections: list, iou_type: str, image_ids=None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(ground_truth)  # pycocotools rewrites segmentations in place
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[:6]


def _undefined_as_nan(stats: np.ndarray) -> dict[str, float]:
    """COCOeval's stats under das-lab's names, its -1 (no ground truth in the range) as NaN."""
    return {name: float(value) if value >= 0 else math.nan for name, value in zip(AP_NAMES, stats)}


def _jittered_detections(ground_truth: dict, seed: int) -> list[dict]:
    """Boxes near the ground truth, some with the wrong class, plus false positives."""
    rng = random.Random(seed)
    category_ids = [c["id"] for c in ground_truth["categories"]]
    sizes = {image["id"]: (image["height"], image["width"]) for image in ground_truth["images"]}
    detections = []
    for annotation in ground_truth["annotations"]:
        x, y, w, h = annotation["bbox"]
        box = [x + rng.uniform(-3, 3), y + rng.uniform(-3, 3), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
        category = annotation["category_id"] if rng.random() < 0.8 else rng.choice(category_ids)
        height, width = sizes[annotation["image_id"]]
        mask = np.zeros((height, width), dtype=np.uint8)
        x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
        mask[y0 : int(box[1] + box[3]), x0 : int(box[0] + box[2])] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        detections.append(
            {
                "image_id": annotation["image_id"],
                "category_id": category,
                "bbox": box,
                "score": rng.random(),
                "segmentation": rle,
            }
        )
    for image_id, (height, width) in sizes.items():
        box = [rng.uniform(0, width / 2), rng.uniform(0, height / 2), 10.0, 12.0]
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[int(box[1]) : int(box[1]) + 12, int(box[0]) : int(box[0]) + 10] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        detections.append(
            {
                "image_id": image_id,
                "category_id": rng.choice(category_ids),
                "bbox": box,
                "score": rng.random() * 0.5,
                "segmentation": rle,
            }
        )
    return detections


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_split(tmp_path_factory.mktemp("coco"), "val2017", num_images=12, seed=5)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_equals_pycocotools(ground_truth: dict, iou_type: str) -> None:
    detections = _jittered_detections(ground_truth, seed=0)
    ours = evaluate_coco(ground_truth, detections, iou_type)
    reference = _pycocotools_stats(ground_truth, json.loads(json.dumps(detections)), iou_type)
    assert 0.1 < ours["map"] < 0.95
    assert ours == pytest.approx(_undefined_as_nan(reference), abs=1e-6, nan_ok=True)


def test_ap_on_a_subset_of_images_equals_pycocotools(ground_truth: dict) -> None:
    image_ids = [image["id"] for image in ground_truth["images"][:6]]
    detections = [d for d in _jittered_detections(ground_truth, seed=1) if d["image_id"] in image_ids]
    ours = evaluate_coco(ground_truth, detections, "bbox", image_ids)
    reference = _pycocotools_stats(ground_truth, detections, "bbox", image_ids)
    assert ours == pytest.approx(_undefined_as_nan(reference), abs=1e-6, nan_ok=True)


def test_annotation_id_zero_is_renumbered_so_perfect_boxes_score_one(ground_truth: dict) -> None:
    broken = json.loads(json.dumps(ground_truth))
    for annotation in broken["annotations"]:
        annotation["id"] -= 1  # the first annotation now has id 0
        del annotation["area"]
    del broken["info"]
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in broken["annotations"]
        if not a["iscrowd"]
    ]
    prepared = prepare_ground_truth(broken)
    ids = [a["id"] for a in prepared["annotations"]]
    assert min(ids) == 1 and len(set(ids)) == len(ids)
    assert all("area" in a and "iscrowd" in a for a in prepared["annotations"])
    assert "info" in prepared and "info" not in broken
    assert evaluate_coco(broken, perfect, "bbox")["map"] == pytest.approx(1.0)


def test_empty_detections_score_zero_where_defined(ground_truth: dict) -> None:
    scores = evaluate_coco(ground_truth, [], "bbox")
    assert {name: scores[name] for name in ("map", "map_50", "map_75", "map_small")} == dict.fromkeys(
        ("map", "map_50", "map_75", "map_small"), 0.0
    )
    assert math.isnan(scores["map_large"])


def test_ap_of_a_size_range_without_ground_truth_is_undefined(ground_truth: dict) -> None:
    """The fake images are at most 72 x 64 pixels: no object is large (area > 96^2), COCOeval says -1."""
    detections = _jittered_detections(ground_truth, seed=2)
    assert _pycocotools_stats(ground_truth, detections, "bbox")[AP_NAMES.index("map_large")] == -1
    scores = evaluate_coco(ground_truth, detections, "bbox")
    assert math.isnan(scores["map_large"]) and 0 < scores["map"] < 1


def test_undefined_metrics_never_win_and_are_null_in_metrics_json(tmp_path) -> None:
    declared = metric_declarations([*DetectionModule.metric_specs, MetricSpec("loss", "min", "value", "loss")])
    history = MetricHistory(declared, "DetectionModule")
    history.epochs = [
        {"val/map": 0.2, "val/map_large": math.nan, "val/map_medium": math.nan, "val/loss": 1.0},
        {"val/map": math.nan, "val/map_large": math.nan, "val/map_medium": 0.4, "val/loss": math.nan},
        {"val/map": 0.1, "val/map_large": math.nan, "val/map_medium": 0.3, "val/loss": 2.0},
    ]
    best = history.best()
    assert best == {"val/map": 0.2, "val/map_large": None, "val/map_medium": 0.4, "val/loss": 1.0}
    record = RunRecord(tmp_path, [])
    record.completed({"test/map_large": None}, best, None)
    text = (tmp_path / "metrics.json").read_text()
    assert '"val/map_large": null' in text and json.loads(text)["final"] == {"test/map_large": None}


def test_results_use_original_ids_and_xywh_boxes() -> None:
    prediction = {
        "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0]]),
        "labels": torch.tensor([2, 0, 3]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "masks": torch.zeros(3, 1, 64, 64),
    }
    prediction["masks"][0, 0, 20:60, 10:40] = 0.9
    results = to_coco_results(7, prediction, category_ids=[3, 17, 90])
    assert [r["category_id"] for r in results] == [17, 90]  # label 0 (background) dropped
    assert results[0]["bbox"] == pytest.approx([10.0, 20.0, 30.0, 40.0])
    assert results[0]["image_id"] == 7 and results[0]["score"] == pytest.approx(0.9)
    rle = dict(results[0]["segmentation"], counts=results[0]["segmentation"]["counts"].encode())
    assert mask_utils.area(rle) == 30 * 40 and results[1]["segmentation"]["size"] == [64, 64]
    json.dumps(results)
