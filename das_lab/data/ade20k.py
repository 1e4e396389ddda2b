"""ADE20K scene parsing (ADEChallengeData2016, 150 classes) as released, for semantic segmentation.

``data.root`` holds the extracted ``ADEChallengeData2016/`` folder (or is that folder), or the
downloaded ``ADEChallengeData2016.zip``, which is extracted once into ``<data.cache_dir>/ade20k/``
(never into ``root``). Label PNGs hold 0 (unlabelled) and 1..150; samples carry them as the
official configs' ``reduce_zero_label`` does: 0 becomes ``IGNORE_INDEX`` and class k becomes k - 1.

Training follows the official mmseg pipeline: random rescale of ``scale`` (2048, 512) by a ratio in
``ratio_range`` keeping the aspect ratio, random crop of ``crop_size`` where no class may cover more
than ``cat_max_ratio`` of the crop (10 tries), horizontal flip, photometric distortion,
normalisation, padding to the crop with 0 (image) and ``IGNORE_INDEX`` (label). Evaluation samples
are the normalised images at their own size with their full-size labels: the segmentation task
rescales to its test scale and maps predictions back.
"""

from __future__ import annotations

import logging
import random
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from das_lab.data.archives import extract_once
from das_lab.data.datamodule import DataModuleBase
from das_lab.data.decode import CorruptImageError, read_rgb

log = logging.getLogger(__name__)

TOP_FOLDER = "ADEChallengeData2016"
ARCHIVE = f"{TOP_FOLDER}.zip"
NUM_CLASSES = 150
IGNORE_INDEX = 255
SPLIT_FOLDERS = {"train": "training", "val": "validation"}
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
EXPECTED_TREE = f"""  <data.root>/{TOP_FOLDER}/          (or <data.root>/{ARCHIVE}, or data.root is that folder)
    objectInfo150.txt
    images/training/ADE_train_00000001.jpg ...     images/validation/ADE_val_00000001.jpg ...
    annotations/training/ADE_train_00000001.png ... annotations/validation/ADE_val_00000001.png ..."""

Sample = tuple[torch.Tensor, torch.Tensor, str]


def read_class_names(path: Path) -> list[str]:
    """Class names in label order from ``objectInfo150.txt`` (first synonym: 'windowpane;window' -> 'windowpane')."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; the release has objectInfo150.txt next to images/ and annotations/"
        )
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    names = {int(row[0]): row[-1].split(";")[0].strip() for row in rows if len(row) >= 2 and row[0].strip().isdigit()}
    if sorted(names) != list(range(1, NUM_CLASSES + 1)):
        raise ValueError(
            f"{path}: lists classes {sorted(names)[:3]}...{sorted(names)[-3:]}; expected one tab-separated row "
            f"per class 1..{NUM_CLASSES} (Idx, Ratio, Train, Val, Name) after a header line"
        )
    return [names[index] for index in range(1, NUM_CLASSES + 1)]


def read_label(path: str | Path) -> torch.Tensor:
    """A release label PNG as a (H, W) uint8 tensor of 0..150, failing in one line on anything else."""
    try:
        label = decode_image(
            torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED
        )
    except (OSError, RuntimeError) as error:
        raise CorruptImageError(f"{path}: cannot decode label map ({error})") from error
    if label.shape[0] != 1 or label.dtype != torch.uint8:
        raise CorruptImageError(
            f"{path}: label map has {label.shape[0]} channel(s) of {label.dtype}; expected a single-channel uint8 PNG "
            f"with values 0..{NUM_CLASSES}"
        )
    top = int(label.max())
    if top > NUM_CLASSES:
        raise CorruptImageError(f"{path}: label value {top}; expected 0 (unlabelled) to {NUM_CLASSES}")
    return label[0]


def to_train_ids(label: torch.Tensor) -> torch.Tensor:
    """Release labels -> training ids: 0 (unlabelled) -> IGNORE_INDEX, class k -> k - 1 (mmseg's reduce_zero_label)."""
    ids = label.to(torch.int64) - 1
    ids[label == 0] = IGNORE_INDEX
    return ids


def rescale_size(height: int, width: int, scale: Sequence[int], ratio: float) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest size whose long side fits max(scale) * ratio and short side min(scale) * ratio."""
    long_edge, short_edge = max(scale) * ratio, min(scale) * ratio
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def crop_box(label: torch.Tensor, crop_size: int, cat_max_ratio: float, tries: int = 10) -> tuple[int, int]:
    """Top-left of a random crop in which no class covers ``cat_max_ratio`` or more of the labelled pixels.

    As mmseg's RandomCrop: at most ``tries`` draws, the last one kept when none qualifies.
    """
    height, width = label.shape
    for _ in range(tries):
        top = random.randint(0, max(height - crop_size, 0))
        left = random.randint(0, max(width - crop_size, 0))
        if cat_max_ratio >= 1.0:
            break
        window = label[top : top + crop_size, left : left + crop_size]
        counts = torch.bincount(window[window != IGNORE_INDEX].flatten(), minlength=1)
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left


class TrainTransform:
    """The official ADE20K training pipeline on a uint8 image and its training-id label map."""

    def __init__(
        self, scale: Sequence[int], ratio_range: Sequence[float], crop_size: int, cat_max_ratio: float, hflip: float
    ) -> None:
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.crop_size = crop_size
        self.cat_max_ratio = cat_max_ratio
        self.hflip = hflip
        # mmseg's PhotoMetricDistortion: each change with probability 0.5; brightness +-32/255 (here a factor),
        # contrast and saturation 0.5..1.5, hue +-18 of OpenCV's 180 (0.1 of the circle)
        self.photometric = v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(brightness=32 / 255)], p=0.5),
                v2.RandomApply([v2.ColorJitter(contrast=0.5)], p=0.5),
                v2.RandomApply([v2.ColorJitter(saturation=0.5)], p=0.5),
                v2.RandomApply([v2.ColorJitter(hue=0.1)], p=0.5),
            ]
        )

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = rescale_size(*image.shape[-2:], self.scale, random.uniform(*self.ratio_range))
        image = F.resize(image, list(size), InterpolationMode.BILINEAR, antialias=False)
        label = F.resize(label[None], list(size), InterpolationMode.NEAREST)[0]
        top, left = crop_box(label, self.crop_size, self.cat_max_ratio)
        image = image[:, top : top + self.crop_size, left : left + self.crop_size]
        label = label[top : top + self.crop_size, left : left + self.crop_size]
        if random.random() < self.hflip:
            image, label = image.flip(-1), label.flip(-1)
        image = normalize(self.photometric(image))
        pad = [0, 0, self.crop_size - image.shape[-1], self.crop_size - image.shape[-2]]
        return F.pad(image, pad, fill=0), F.pad(label[None], pad, fill=IGNORE_INDEX)[0]


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB -> float, ImageNet mean/std (the official configs' img_norm_cfg)."""
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), IMAGE_MEAN, IMAGE_STD)


def eval_transform(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation samples keep their own size: the task rescales to its test scale and back."""
    return normalize(image), label


class ADE20KSegmentation(Dataset):
    """(image, training-id label map, file stem) samples of one split, checked as they are read."""

    def __init__(self, samples: Sequence[tuple[str, str]], transform: Callable[..., tuple[torch.Tensor, torch.Tensor]]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded uint8 image and release label of sample ``index``; one-line error on a bad pair."""
        image_path, label_path = self.samples[index]
        image, label = read_rgb(image_path), read_label(label_path)
        if tuple(image.shape[-2:]) != tuple(label.shape):
            raise CorruptImageError(
                f"{label_path}: label map is {label.shape[1]}x{label.shape[0]} but {Path(image_path).name} is "
                f"{image.shape[2]}x{image.shape[1]}; expected the same width x height"
            )
        return image, label

    def __getitem__(self, index: int) -> Sample:
        image, label = self.load_image(index)
        image, ids = self.transform(image, to_train_ids(label))
        return image, ids, Path(self.samples[index][0]).stem


def collate_segmentation(batch: list[Sample]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Images, label maps and names as lists: evaluation images keep their own sizes."""
    images, labels, names = zip(*batch)
    return list(images), list(labels), list(names)


def list_split(folder: Path, split: str) -> list[tuple[str, str]]:
    """(image, label) paths of a split, failing in one line on an image without its label map."""
    image_dir = folder / "images" / SPLIT_FOLDERS[split]
    label_dir = folder / "annotations" / SPLIT_FOLDERS[split]
    for directory in (image_dir, label_dir):
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: not found; expected the release layout:\n{EXPECTED_TREE}")
    samples = []
    for image in sorted(image_dir.glob("*.jpg")):
        label = label_dir / f"{image.stem}.png"
        if not label.is_file():
            raise FileNotFoundError(f"{image}: no label map; expected {label}")
        samples.append((str(image), str(label)))
    if not samples:
        raise ValueError(f"{image_dir}: no .jpg images; expected ADE_*_%08d.jpg files of the release")
    return samples


def extract_zip(archive: Path, destination: Path) -> None:
    """Extract the release zip, which must hold everything under its top folder."""
    with zipfile.ZipFile(archive) as handle:
        names = handle.namelist()
        if not any(name.startswith(f"{TOP_FOLDER}/") for name in names):
            raise ValueError(
                f"{archive}: no top folder {TOP_FOLDER}/ (found {sorted({n.split('/')[0] for n in names})[:5]}); "
                f"expected the zip as released, whose entries all start with {TOP_FOLDER}/"
            )
        handle.extractall(destination)


class ADE20KDataModule(DataModuleBase):
    """ADE20K loaders: official augmentation for training, full-size images for evaluation."""

    dataset_name = "ade20k"

    def __init__(
        self,
        root: str,
        cache_dir: str,
        num_classes: int,
        scale: Sequence[int],
        ratio_range: Sequence[float],
        crop_size: int,
        cat_max_ratio: float,
        hflip: float,
        expected_sizes: Optional[dict[str, int]],
        batch_size: int,
        num_workers: int,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: Optional[int] = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor)
        if num_classes != NUM_CLASSES:
            raise ValueError(f"data.num_classes={num_classes}: ADEChallengeData2016 has {NUM_CLASSES} classes")
        if len(scale) != 2 or min(scale) < 1:
            raise ValueError(f"data.scale={list(scale)}: expected [long side, short side] in pixels, e.g. [2048, 512]")
        if not (len(ratio_range) == 2 and 0 < ratio_range[0] <= ratio_range[1]):
            raise ValueError(f"data.ratio_range={list(ratio_range)}: expected [low, high] with 0 < low <= high")
        if crop_size < 1 or not 0 < cat_max_ratio <= 1:
            raise ValueError(
                f"data.crop_size={crop_size}, data.cat_max_ratio={cat_max_ratio}: expected >= 1 and (0, 1]"
            )
        self.root = Path(root).expanduser()
        self.cache_dir = cache_dir
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.train_transform = TrainTransform(scale, ratio_range, crop_size, cat_max_ratio, hflip)
        self.expected_sizes = dict(expected_sizes or {})
        self.layout = ""

    def resolve_root(self) -> tuple[Path, str]:
        """The release folder to read (extracting the zip into the cache first) and a sentence naming the layout."""
        if (self.root / TOP_FOLDER).is_dir():
            return self.root / TOP_FOLDER, f"extracted folder {self.root / TOP_FOLDER}"
        if (self.root / "images").is_dir() and (self.root / "annotations").is_dir():
            return self.root, f"extracted folder {self.root}"
        archive = self.root / ARCHIVE
        if archive.is_file():
            extracted = extract_once(
                [archive], self.cache_dir, self.dataset_name, lambda dest: extract_zip(archive, dest)
            )
            return extracted / TOP_FOLDER, f"{archive} extracted into {extracted}"
        found = sorted(p.name for p in self.root.iterdir())[:10] if self.root.is_dir() else "the folder does not exist"
        raise FileNotFoundError(
            f"ADE20K not found in data.root={self.root} (found {found}). Expected:\n{EXPECTED_TREE}"
        )

    def prepare_data(self) -> None:
        """Extract the zip into the cache once (Lightning calls this on one process per node)."""
        self.resolve_root()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        folder, self.layout = self.resolve_root()
        self.class_names = read_class_names(folder / "objectInfo150.txt")
        self.train_set = ADE20KSegmentation(list_split(folder, "train"), self.train_transform)
        self.val_set = ADE20KSegmentation(list_split(folder, "val"), eval_transform)
        self.test_set = self.val_set
        log.info("ade20k: %s; train %d, val %d images", self.layout, len(self.train_set), len(self.val_set))

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        return collate_segmentation
