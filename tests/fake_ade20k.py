"""A tiny ADEChallengeData2016 in the release's layout (folder or zip), for tests of any module.

Every image is 40x30 pixels (one grayscale JPEG among them, as in the release); its label PNG
(uint8, 0 = unlabelled, 1..150) holds vertical stripes of a few classes, so crops see several.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TOP = "ADEChallengeData2016"
SIZE = (40, 30)  # width, height
CLASS_NAMES = [f"class{k}" for k in range(1, 151)]
CLASS_NAMES[0], CLASS_NAMES[1] = "wall", "building"


@dataclass
class FakeADE20K:
    """What ``make_ade20k`` wrote: the folder to use as data.root and the label maps per split."""

    root: Path
    folder: Path  # root/ADEChallengeData2016
    labels: dict[str, dict[str, np.ndarray]]  # split folder -> file stem -> release label map


def label_map(index: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Release label map number ``index``: stripes of classes 1 + (index + k) % 150, with an unlabelled band."""
    width, height = size
    stripe = np.arange(width) * 4 // width
    label = (1 + (index + stripe) % 150).astype(np.uint8)[None, :].repeat(height, axis=0)
    label[: height // 6] = 0
    return label


def _object_info() -> str:
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    rows += [f"{k}\t0.01\t10\t1\t{name};synonym" for k, name in enumerate(CLASS_NAMES, start=1)]
    return "\n".join(rows) + "\n"


def make_ade20k(root: Path, train: int = 4, val: int = 3) -> FakeADE20K:
    """Write ``train`` and ``val`` image/label pairs under ``root/ADEChallengeData2016``."""
    folder = root / TOP
    labels: dict[str, dict[str, np.ndarray]] = {}
    for split, prefix, count in (("training", "ADE_train", train), ("validation", "ADE_val", val)):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / split).mkdir(parents=True, exist_ok=True)
        labels[split] = {}
        for i in range(count):
            stem = f"{prefix}_{i + 1:08d}"
            label = label_map(i + (0 if split == "training" else 50))
            value = label.astype(np.int64)
            rgb = np.stack([value * 1.5, 255 - value, (value * 7) % 256], axis=-1).astype(np.uint8)
            image = Image.fromarray(rgb)
            (image.convert("L") if i == 1 else image).save(folder / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(label).save(folder / "annotations" / split / f"{stem}.png")
            labels[split][stem] = label
    (folder / "objectInfo150.txt").write_text(_object_info())
    return FakeADE20K(root, folder, labels)


def zip_release(fake: FakeADE20K, destination: Path, top: str = TOP) -> Path:
    """Pack the fake release as ``destination/ADEChallengeData2016.zip`` (entries under ``top``/) and remove the folder."""
    destination.mkdir(parents=True, exist_ok=True)
    archive = destination / f"{TOP}.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(fake.folder.rglob("*")):
            handle.write(path, f"{top}/{path.relative_to(fake.folder)}")
    shutil.rmtree(fake.folder)
    return archive
