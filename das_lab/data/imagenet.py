"""ImageNet-1k (ILSVRC2012) from the folder layout or from the official archives, detected automatically.

Folder layout: ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``. Archive layout:
``ILSVRC2012_img_train.tar``, ``ILSVRC2012_img_val.tar`` and ``ILSVRC2012_devkit_t12.tar.gz`` in
``<root>``, extracted once to ``data.cache_dir`` (never inside ``data.root``) as torchvision's
``ImageNet`` prepares them: the devkit's ``meta.mat`` maps ``ILSVRC2012_ID`` -> wnid for the leaf
synsets, and ``ILSVRC2012_validation_ground_truth.txt`` gives the ID of each validation image. The
class index models use is the position of the wnid in sorted order, which differs from the ID
order, so labels always go ID -> wnid -> index. Archives are checked against torchvision's MD5
sums before extraction (``data.verify_md5``; turn it off only for archives you repacked yourself).

Subsets: ``num_classes=k < 1000`` keeps k classes evenly spaced in sorted-wnid order (class
``floor(i * n / k)`` for i < k, n the classes found: ``num_classes=100`` keeps every 10th);
``max_per_class=m`` keeps the first m training images (sorted by file name) of each class.
Validation is the official val split and doubles as test (ImageNet's test labels are private).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional

import scipy.io
from timm.data import ImageNetInfo
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.datasets.imagenet import ARCHIVE_META
from torchvision.datasets.utils import check_integrity

from das_lab.data.archives import extract_once
from das_lab.data.datamodule import ImageClassificationDataModule, SplitSamples
from das_lab.data.litdata_shards import ShardsFormat

OFFICIAL_SIZES = {"train": 1281167, "val": 50000, "test": 50000}
OFFICIAL_CLASSES = 1000
CLASSES_FILE = "classes.json"
DEVKIT_DIR = "ILSVRC2012_devkit_t12/data"
EXPECTED_TREE = """\
  <root>/train/n01440764/n01440764_10026.JPEG ...   (1000 wnid folders)
  <root>/val/n01440764/ILSVRC2012_val_00000293.JPEG ...
or the official archives:
  <root>/ILSVRC2012_img_train.tar  ILSVRC2012_img_val.tar  ILSVRC2012_devkit_t12.tar.gz
Download them (after registering) from https://image-net.org/challenges/LSVRC/2012/2012-downloads.php"""


def readable_names(wnids: list[str], words: Mapping[str, str]) -> list[str]:
    """First lemma of each class ('tench, Tinca tinca' -> 'tench'), made unique with the wnid."""
    first = [words.get(wnid, wnid).split(",")[0].strip() for wnid in wnids]
    return [name if first.count(name) == 1 else f"{name} ({wnid})" for name, wnid in zip(first, wnids)]


def first_per_class(samples: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    """The first ``limit`` samples of every class, in the given order."""
    counts: Counter[int] = Counter()
    kept = []
    for path, label in samples:
        if counts[label] < limit:
            counts[label] += 1
            kept.append((path, label))
    return kept


def parse_devkit(devkit: Path) -> tuple[dict[str, str], list[str]]:
    """Leaf synsets' wnid -> words, and the wnid of every validation image, from the devkit archive."""
    with tarfile.open(devkit) as tar:
        meta = scipy.io.loadmat(io.BytesIO(tar.extractfile(f"{DEVKIT_DIR}/meta.mat").read()), squeeze_me=True)
        truth = tar.extractfile(f"{DEVKIT_DIR}/ILSVRC2012_validation_ground_truth.txt").read().decode().split()
    synsets = meta["synsets"]
    leaves = synsets[synsets["num_children"] == 0]
    id_to_wnid = {int(i): str(w) for i, w in zip(leaves["ILSVRC2012_ID"], leaves["WNID"])}
    words = {str(w): str(t) for w, t in zip(leaves["WNID"], leaves["words"])}
    return words, [id_to_wnid[int(i)] for i in truth]


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tar.extractfile(member) as source, open(folder / Path(member.name).name, "wb") as target:
        shutil.copyfileobj(source, target)


def extract_archives(root: Path, destination: Path, verify_md5: bool) -> None:
    """Turn the three official archives into train/<wnid>/, val/<wnid>/ and classes.json."""
    for name, md5 in ARCHIVE_META.values():
        if verify_md5 and not check_integrity(str(root / name), md5):
            raise ValueError(
                f"{root / name}: MD5 differs from the official {md5}; re-download it, or set "
                "data.verify_md5=false if you repacked the archive yourself"
            )
    words, val_wnids = parse_devkit(root / ARCHIVE_META["devkit"][0])
    with tarfile.open(root / ARCHIVE_META["train"][0], mode="r|") as outer:
        for class_tar in outer:
            if class_tar.isfile() and class_tar.name.endswith(".tar"):
                with tarfile.open(fileobj=outer.extractfile(class_tar), mode="r|") as inner:
                    wnid_folder = destination / "train" / Path(class_tar.name).stem
                    for image in inner:
                        if image.isfile():
                            _copy_member(inner, image, wnid_folder)
    with tarfile.open(root / ARCHIVE_META["val"][0], mode="r|") as val:
        for image in val:
            if image.isfile():
                number = int(Path(image.name).stem.rsplit("_", 1)[-1])
                _copy_member(val, image, destination / "val" / val_wnids[number - 1])
    (destination / CLASSES_FILE).write_text(json.dumps(words, indent=0, sort_keys=True))


class ImageNetDataModule(ShardsFormat, ImageClassificationDataModule):
    """ImageNet-1k (or an evenly spaced class subset) from folders or the official archives."""

    dataset_name = "imagenet"
    title = "ImageNet"
    expected_tree = EXPECTED_TREE

    def __init__(
        self,
        root: str,
        cache_dir: str,
        image_size: int,
        num_classes: int,
        max_per_class: Optional[int],
        verify_md5: bool,
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
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f"data.max_per_class={max_per_class}: expected null (all images) or a positive integer")
        self.cache_dir = cache_dir
        self.init_format(format, root, cache_dir)
        self.max_per_class = max_per_class
        self.verify_md5 = verify_md5

    def resolve_root(self) -> tuple[Path, str]:
        self.require_root()
        if (self.root / "train").is_dir() and (self.root / "val").is_dir():
            return self.root, f"folder layout (train/, val/) in {self.root}"
        archives = [self.root / name for name, _ in ARCHIVE_META.values()]
        missing = [a.name for a in archives if not a.is_file()]
        if missing:
            raise self.layout_error(f"neither train/ + val/ nor the archive(s) {missing} are there")
        folder = extract_once(
            archives,
            self.cache_dir,
            self.dataset_name,
            lambda destination: extract_archives(self.root, destination, self.verify_md5),
        )
        return folder, f"official archives in {self.root}, extracted to {folder}"

    def _samples(self, folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
        try:
            return make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as error:
            raise self.layout_error(f"{folder} lacks images for some classes ({error})") from error

    def read_splits(self, folder: Path) -> SplitSamples:
        found = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        if self.num_classes > len(found):
            raise ValueError(
                f"data.num_classes={self.num_classes} but {folder / 'train'} has {len(found)} class folders; "
                f"set data.num_classes <= {len(found)}"
            )
        wnids = [found[i * len(found) // self.num_classes] for i in range(self.num_classes)]
        class_to_idx = {wnid: index for index, wnid in enumerate(wnids)}
        train = self._samples(folder / "train", class_to_idx)
        if self.max_per_class is not None:
            train = first_per_class(train, self.max_per_class)
        val = self._samples(folder / "val", class_to_idx)
        classes_file = folder / CLASSES_FILE
        if classes_file.is_file():
            words = json.loads(classes_file.read_text())
        else:
            words = ImageNetInfo().label_descriptions(as_dict=True)
        official = (
            self.num_classes == OFFICIAL_CLASSES and len(found) == OFFICIAL_CLASSES and self.max_per_class is None
        )
        return SplitSamples(
            train=train,
            val=val,
            test=val,
            class_names=readable_names(wnids, words),
            expected_sizes=dict(OFFICIAL_SIZES) if official else {},
        )
