"""A tiny COCO 2017 folder (real JPEGs, real instances JSON) for detection tests.

Layout as downloaded: ``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``.
Each image shows filled rectangles and triangles on a grey background; every shape is an
annotation with a polygon and its box. Category ids are non-contiguous (3, 17, 90). Per split,
one image has no annotation and one has only a crowd region (an RLE mask), so training must
skip both; annotation ids start at 1.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 17, "name": "cat"}, {"id": 90, "name": "toothbrush"}]
COLOURS = {3: (220, 40, 40), 17: (40, 200, 40), 90: (40, 40, 220)}


def _shape(rng: random.Random, width: int, height: int) -> tuple[list[float], list[float]]:
    """A random rectangle or triangle: its polygon and its [x, y, w, h] box."""
    w, h = rng.randint(10, width // 2), rng.randint(10, height // 2)
    x, y = rng.randint(0, width - w - 1), rng.randint(0, height - h - 1)
    if rng.random() < 0.5:
        polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
    else:
        polygon = [x, y + h, x + w / 2, y, x + w, y + h]
    xs, ys = polygon[0::2], polygon[1::2]
    return [float(v) for v in polygon], [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def make_split(root: Path, split: str, num_images: int, seed: int) -> dict[str, Any]:
    """Write ``num_images`` JPEGs and their instances JSON; returns the JSON content."""
    rng = random.Random(seed)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = seed * 1000 + index + 1
        width, height = rng.choice([(64, 48), (56, 64), (72, 40)])
        canvas = Image.new("RGB", (width, height), (128, 128, 128))
        draw = ImageDraw.Draw(canvas)
        file_name = f"{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        if index == 1:
            crowd = np.zeros((height, width), dtype=np.uint8)
            crowd[5:25, 5:35] = 1
            draw.rectangle([5, 5, 34, 24], fill=(200, 200, 40))
            rle = mask_utils.encode(np.asfortranarray(crowd))
            annotations.append(
                {
                    "image_id": image_id,
                    "category_id": 17,
                    "iscrowd": 1,
                    "bbox": [5.0, 5.0, 30.0, 20.0],
                    "area": float(crowd.sum()),
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                }
            )
        elif index > 1:
            for _ in range(rng.randint(1, 3)):
                category = rng.choice(CATEGORIES)["id"]
                polygon, bbox = _shape(rng, width, height)
                draw.polygon(polygon, fill=COLOURS[category])
                annotations.append(
                    {
                        "image_id": image_id,
                        "category_id": category,
                        "iscrowd": 0,
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3],
                        "segmentation": [polygon],
                    }
                )
        canvas.save(image_dir / file_name, quality=90)
    for number, annotation in enumerate(annotations, start=1):
        annotation["id"] = number
    dataset = {
        "info": {"description": "das-lab test set"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))
    return dataset


def make_fake_coco(root: Path, num_train: int = 6, num_val: int = 4) -> Path:
    """A COCO 2017-style folder under ``root`` with train2017 and val2017."""
    make_split(root, "train2017", num_train, seed=1)
    make_split(root, "val2017", num_val, seed=2)
    return root
