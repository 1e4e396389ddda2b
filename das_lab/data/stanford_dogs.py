"""Stanford Dogs (120 breeds, 12,000 train / 8,580 test) read from its official release.

``data.root`` holds either the extracted release or its three archives (extracted once to
``data.cache_dir``, never inside ``data.root``):

    <root>/Images/<wnid>-<breed>/<wnid>_<n>.jpg        from images.tar
    <root>/Annotation/<wnid>-<breed>/<wnid>_<n>        from annotation.tar (PASCAL-VOC XML, no extension)
    <root>/train_list.mat, test_list.mat, file_list.mat from lists.tar

The .mat lists (MATLAB v5) hold N x 1 cells ``file_list`` / ``annotation_list`` and ``labels``
(1-based: label k is the k-th breed folder in sorted order). The papers report test accuracy as
validation (``val_per_class=0``: val is the test split); ``val_per_class=k`` instead holds out k
training images per breed, chosen with ``split_seed``.
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import scipy.io
import torch

from das_lab.data.archives import extract_once, extract_tar
from das_lab.data.datamodule import ImageClassificationDataModule, SplitSamples
from das_lab.data.datasets import ImageSampleDataset
from das_lab.data.decode import CorruptImageError, read_rgb
from das_lab.data.litdata_shards import ShardsFormat

ARCHIVES = ("images.tar", "annotation.tar", "lists.tar")
OFFICIAL_TRAIN = 12000
OFFICIAL_TEST = 8580
OFFICIAL_CLASSES = 120
EXPECTED_TREE = """\
  <root>/
    Images/n02085620-Chihuahua/n02085620_10074.jpg ...   (images.tar)
    Annotation/n02085620-Chihuahua/n02085620_10074 ...   (annotation.tar; needed for data.crop_to_bbox)
    train_list.mat  test_list.mat  file_list.mat         (lists.tar)
or the archives themselves:
  <root>/images.tar  annotation.tar  lists.tar
Get them from http://vision.stanford.edu/aditya86/ImageNetDogs/ (Images, Annotations, Lists)."""


def breed_name(folder: str) -> str:
    """Readable breed of a class folder: 'n02085782-Japanese_spaniel' -> 'Japanese spaniel'."""
    return folder.split("-", 1)[-1].replace("_", " ")


def read_box(annotation: Path) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) enclosing every dog an annotation file marks."""
    try:
        boxes = [
            [int(float(obj.findtext(f"bndbox/{key}"))) for key in ("xmin", "ymin", "xmax", "ymax")]
            for obj in ET.parse(annotation).getroot().iter("object")
        ]
    except (OSError, ET.ParseError, TypeError, ValueError) as error:
        raise CorruptImageError(f"{annotation}: cannot read the bounding boxes ({error})") from error
    if not boxes:
        raise CorruptImageError(f"{annotation}: no <object><bndbox> in this annotation")
    x0, y0, x1, y1 = zip(*boxes)
    return min(x0), min(y0), max(x1), max(y1)


def _mat_strings(cells: Any) -> list[str]:
    return [str(cell.flat[0]) for cell in cells.flatten()]


class BoxCroppedDataset(ImageSampleDataset):
    """Images cropped to the union of their annotated dog boxes."""

    def __init__(self, samples: list[tuple[str, int]], annotations: list[str], transform: Callable, skip_corrupt: bool):
        super().__init__(samples, transform, skip_corrupt)
        self.annotations = annotations

    def load_image(self, index: int) -> torch.Tensor:
        image = read_rgb(self.samples[index][0])
        x0, y0, x1, y1 = read_box(Path(self.annotations[index]))
        height, width = image.shape[-2:]
        x0, y0 = max(0, min(x0, width - 1)), max(0, min(y0, height - 1))
        x1, y1 = max(x0 + 1, min(x1, width)), max(y0 + 1, min(y1, height))
        return image[:, y0:y1, x0:x1]


class StanfordDogsDataModule(ShardsFormat, ImageClassificationDataModule):
    """Stanford Dogs from the official release (folders or archives), optionally cropped to the dogs."""

    dataset_name = "stanford_dogs"
    title = "Stanford Dogs"
    expected_tree = EXPECTED_TREE

    def __init__(
        self,
        root: str,
        cache_dir: str,
        image_size: int,
        num_classes: int,
        val_per_class: int,
        split_seed: int,
        crop_to_bbox: bool,
        train_augment: Mapping[str, Any],
        crop_pct: float,
        eval_interpolation: str,
        skip_corrupt: bool,
        batch_size: int,
        num_workers: int,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: Optional[int] = None,
        format: str = "folder",
        normalize_on: str = "auto",
    ) -> None:
        super().__init__(
            root,
            image_size,
            num_classes,
            train_augment,
            crop_pct,
            eval_interpolation,
            skip_corrupt,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            prefetch_factor,
            normalize_on,
        )
        if not 0 <= val_per_class < 100:
            raise ValueError(
                f"data.val_per_class={val_per_class}: expected 0 (val = test) to 99 of the 100 train images per breed"
            )
        self.cache_dir = cache_dir
        self.init_format(format, root, cache_dir)
        self.val_per_class = val_per_class
        self.split_seed = split_seed
        self.crop_to_bbox = crop_to_bbox
        if crop_to_bbox and format == "litdata":
            raise ValueError(
                "data.crop_to_bbox=true needs the annotations, which shards do not hold; use data.format=folder"
            )
        self._annotations: dict[str, str] = {}

    def resolve_root(self) -> tuple[Path, str]:
        self.require_root()
        if (self.root / "Images").is_dir() and (self.root / "train_list.mat").is_file():
            if self.crop_to_bbox and not (self.root / "Annotation").is_dir():
                raise self.layout_error("data.crop_to_bbox=true needs the Annotation/ folder (annotation.tar)")
            return self.root, f"extracted release in {self.root}"
        archives = [self.root / name for name in ARCHIVES if (self.root / name).is_file()]
        required = {"images.tar", "lists.tar"} | ({"annotation.tar"} if self.crop_to_bbox else set())
        missing = sorted(required - {a.name for a in archives})
        if missing:
            raise self.layout_error(f"neither Images/ + train_list.mat nor the archive(s) {missing} are there")

        def extract(destination: Path) -> None:
            for archive in archives:
                extract_tar(archive, destination)

        folder = extract_once(archives, self.cache_dir, self.dataset_name, extract)
        return folder, f"archives {[a.name for a in archives]} in {self.root}, extracted to {folder}"

    def _read_list(self, folder: Path, split: str, class_folders: list[str]) -> list[tuple[str, int]]:
        path = folder / f"{split}_list.mat"
        try:
            mat = scipy.io.loadmat(path)
            files, labels = _mat_strings(mat["file_list"]), mat["labels"].flatten().astype(int) - 1
            annotations = (
                _mat_strings(mat["annotation_list"])
                if "annotation_list" in mat
                else [f.rsplit(".", 1)[0] for f in files]
            )
        except (OSError, ValueError, KeyError) as error:
            raise self.layout_error(f"cannot read {path} ({error!r})") from error
        samples = []
        for file, label, annotation in zip(files, labels, annotations):
            if not 0 <= label < len(class_folders) or file.split("/")[0] != class_folders[label]:
                raise ValueError(
                    f"{path}: {file} has label {label + 1} but label {label + 1} is folder "
                    f"{class_folders[label] if 0 <= label < len(class_folders) else '<none>'} of Images/; "
                    "the lists and the images come from different releases: re-extract lists.tar and images.tar"
                )
            image = str(folder / "Images" / file)
            samples.append((image, int(label)))
            self._annotations[image] = str(folder / "Annotation" / annotation)
        return samples

    def read_splits(self, folder: Path) -> SplitSamples:
        class_folders = sorted(p.name for p in (folder / "Images").iterdir() if p.is_dir())
        train = self._read_list(folder, "train", class_folders)
        test = self._read_list(folder, "test", class_folders)
        val = test
        if self.val_per_class:
            by_class: dict[int, list[tuple[str, int]]] = {}
            for sample in train:
                by_class.setdefault(sample[1], []).append(sample)
            rng = random.Random(self.split_seed)
            held_out = set()
            for label in sorted(by_class):
                held_out.update(rng.sample(by_class[label], min(self.val_per_class, len(by_class[label]) - 1)))
            val = [s for s in train if s in held_out]
            train = [s for s in train if s not in held_out]
        expected = {}
        if len(class_folders) == OFFICIAL_CLASSES:
            held_out = OFFICIAL_CLASSES * self.val_per_class
            expected = {"train": OFFICIAL_TRAIN - held_out, "val": held_out or OFFICIAL_TEST, "test": OFFICIAL_TEST}
        return SplitSamples(
            train=train,
            val=val,
            test=test,
            class_names=[breed_name(name) for name in class_folders],
            expected_sizes=expected,
        )

    def make_dataset(self, samples: list[tuple[str, int]], transform: Callable) -> ImageSampleDataset:
        if not self.crop_to_bbox:
            return super().make_dataset(samples, transform)
        return BoxCroppedDataset(
            samples, [self._annotations[path] for path, _ in samples], transform, self.skip_corrupt
        )
