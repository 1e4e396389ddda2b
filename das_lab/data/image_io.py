"""Turning image datasets on disk into samples: decoding, corrupt-file policy, archive cache, shared datamodule.

Public releases are not clean: ImageNet ships a PNG named ``.JPEG``, CMYK and grayscale JPEGs and
4-channel images. Every file is decoded from its bytes (the extension is ignored) with
``torchvision.io`` (libjpeg-turbo / libpng) into a ``uint8`` CHW RGB tensor; formats torchvision
cannot decode (BMP, TIFF, ...) fall back to Pillow. An empty (0-byte) file, or one neither can decode, is corrupt.

Corrupt-file policy (``data.skip_corrupt``): by default the first corrupt file stops the run with
its path. With ``skip_corrupt=true`` the dataset returns the next readable sample instead and
flags the bad index in a shared-memory mask (visible across DataLoader workers);
``SkippedImagesReport``, which the das-lab datamodules attach to the trainer themselves, logs the
count and the paths at the end of every train/validation/test epoch and clears the mask.

Archives are extracted once into ``<data.cache_dir>/<dataset>/<key>`` (``extract_once``); the user's
dataset folder is only ever read.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from das_lab.data.base import DataModuleBase
from das_lab.data.transforms import build_eval_transform, build_train_transform, normalize_augment
from das_lab.errors import UserError

log = logging.getLogger(__name__)

_TORCHVISION_UNSUPPORTED = "Unsupported image file"
_COMPLETE_MARKER = ".das_lab_extracted"
_FIX = "replace or delete the file, or set data.skip_corrupt=true to skip such files"


class CorruptImageError(UserError, RuntimeError):
    """An image file that no decoder can read; the message is one line naming the file.

    A DataLoader worker re-raises it with the worker's whole traceback as the message; only the
    traceback's last line, the original message, is kept.
    """

    def __init__(self, message: str) -> None:
        last_line = message.rstrip().rsplit("\n", 1)[-1]
        super().__init__(last_line.removeprefix(f"{__name__}.{type(self).__name__}: "))


def decode_rgb(data: bytes, path: str = "<bytes>") -> torch.Tensor:
    """Decode image bytes of any common format into a uint8 (3, H, W) RGB tensor."""
    if not data:
        raise CorruptImageError(f"{path}: empty file (0 bytes); {_FIX}")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        if _TORCHVISION_UNSUPPORTED not in str(error):
            raise CorruptImageError(f"{path}: cannot decode image ({error}); {_FIX}") from error
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except UnidentifiedImageError as error:
        raise CorruptImageError(f"{path}: cannot decode image (not a format torchvision or Pillow can read); {_FIX}") from error
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"{path}: cannot decode image ({error}); {_FIX}") from error
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def read_rgb(path: str | Path) -> torch.Tensor:
    """Read and decode one image file into a uint8 (3, H, W) RGB tensor."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CorruptImageError(f"{path}: cannot read file ({error})") from error
    return decode_rgb(data, str(path))


class ImageSampleDataset(Dataset):
    """(path, label) samples decoded to RGB tensors, with the corrupt-file policy applied.

    ``load`` turns a sample index into a uint8 RGB tensor (it may crop, e.g. to a bounding box);
    ``transform`` maps that tensor to the model's input.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
        skip_corrupt: bool,
        load: Optional[Callable[[int], torch.Tensor]] = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self._load = load
        self.skipped = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        """Labels in sample order (for stratified splits and summaries)."""
        return [label for _, label in self.samples]

    def load_image(self, index: int) -> torch.Tensor:
        """The decoded uint8 RGB image of sample ``index``, before any transform."""
        if self._load is not None:
            return self._load(index)
        return read_rgb(self.samples[index][0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            try:
                image = self.load_image(candidate)
            except CorruptImageError:
                if not self.skip_corrupt:
                    raise
                self.skipped[candidate] = True
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, self.samples[candidate][1]
        raise CorruptImageError(f"none of the {len(self.samples)} images of this split could be decoded")

    def take_skipped(self) -> list[str]:
        """Paths skipped since the last call, clearing the record."""
        paths = [self.samples[i][0] for i in self.skipped.nonzero().flatten().tolist()]
        self.skipped.zero_()
        return paths


class SkippedImagesReport(L.Callback):
    """Logs, at the end of each epoch, which corrupt images ``skip_corrupt=true`` replaced."""

    def __init__(self) -> None:
        self.last_counts: dict[str, int] = {}

    def _report(self, trainer: L.Trainer, split: str) -> None:
        dataset = getattr(trainer.datamodule, f"{split}_set", None)
        if not isinstance(dataset, ImageSampleDataset):
            return
        paths = dataset.take_skipped()
        if paths:
            shown = ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")
            log.warning(
                "%s epoch %d: %d corrupt image(s) skipped and replaced (data.skip_corrupt=true): %s",
                split, trainer.current_epoch, len(paths), shown,
            )
        self.last_counts[split] = len(paths)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "test")


def attach_skipped_report(datamodule: L.LightningDataModule) -> None:
    """Give the datamodule's trainer a ``SkippedImagesReport`` unless it already has one."""
    trainer = datamodule.trainer
    if trainer is None or any(isinstance(cb, SkippedImagesReport) for cb in trainer.callbacks):
        return
    trainer.callbacks.append(SkippedImagesReport())


def _archive_key(archives: Sequence[Path]) -> str:
    digest = hashlib.sha1()
    for archive in archives:
        stat = archive.stat()
        digest.update(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def extract_once(
    archives: Sequence[Path], cache_dir: str | Path, dataset: str, extract: Callable[[Path], None]
) -> Path:
    """Extract archives into ``<cache_dir>/<dataset>/<key>`` the first time only, never beside them.

    The key hashes the archives' paths, sizes and mtimes, so a replaced archive is extracted again.
    Extraction goes to a temporary folder renamed into place when complete: an interrupted run
    leaves no half-extracted cache behind, and concurrent runs cannot read a partial one.
    """
    target = Path(cache_dir).expanduser() / dataset / _archive_key(archives)
    names = ", ".join(str(a) for a in archives)
    if (target / _COMPLETE_MARKER).is_file():
        log.info("%s: using the copy of %s extracted earlier in %s", dataset, names, target)
        return target
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log.info("%s: extracting %s into %s (once; later runs reuse it)", dataset, names, target)
    try:
        extract(partial)
        (partial / _COMPLETE_MARKER).write_text("\n".join(str(a) for a in archives) + "\n")
        os.rename(partial, target)
    except OSError:
        if not (target / _COMPLETE_MARKER).is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def extract_tar(archive: Path, destination: Path) -> None:
    """Extract a (possibly compressed) tar refusing absolute paths, links out of it and devices."""
    with tarfile.open(archive) as tar:
        tar.extractall(destination, filter="data")


@dataclass
class SplitSamples:
    """What a dataset reader found: samples per split, readable class names, where and how."""

    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    class_names: list[str]
    expected_sizes: dict[str, int] = field(default_factory=dict)


class ImageClassificationDataModule(DataModuleBase):
    """Shared plumbing of the das-lab image datamodules: recipe transforms, corrupt-file policy.

    Subclasses implement ``resolve_root`` (find the layout, extract archives to the cache) and
    ``read_splits`` (parse their on-disk format) and may override
    ``make_dataset`` (e.g. to crop to bounding boxes). ``setup`` builds the three datasets; the
    training transform comes from ``train_augment`` (set by ``conf/recipe``), eval from
    ``crop_pct`` and ``eval_interpolation``.
    """

    dataset_name = "images"
    title = "the dataset"
    expected_tree = ""

    def __init__(
        self,
        root: str,
        image_size: int,
        num_classes: int,
        train_augment: Mapping[str, Any],
        crop_pct: float,
        eval_interpolation: str,
        skip_corrupt: bool,
        batch_size: int,
        num_workers: int,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: Optional[int] = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor)
        if num_classes < 1:
            raise ValueError(f"data.num_classes={num_classes}: expected a positive integer")
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.num_classes = num_classes
        self.train_augment = normalize_augment(train_augment)
        self.train_transform = build_train_transform(image_size, self.train_augment)
        self.crop_pct = crop_pct
        self.eval_interpolation = eval_interpolation
        self.eval_transform = build_eval_transform(image_size, crop_pct, eval_interpolation)
        self.skip_corrupt = skip_corrupt
        self.layout = ""
        self.expected_sizes: dict[str, int] = {}

    def eval_data_config(self) -> dict[str, Any]:
        """The eval preprocessing in timm's terms (exported models' pretrained_cfg)."""
        return {
            "input_size": (3, self.image_size, self.image_size), "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "crop_pct": self.crop_pct, "interpolation": self.eval_interpolation,
        }

    def layout_error(self, detail: str) -> FileNotFoundError:
        """The one setup error for a missing or misplaced dataset: what is wrong, the expected tree, where to get it."""
        if self.root.is_dir():
            detail = f"{detail} (found {sorted(p.name for p in self.root.iterdir())[:10]})"
        return FileNotFoundError(f"{self.title} not found in data.root={self.root}: {detail}. Expected:\n{self.expected_tree}")

    def require_root(self) -> None:
        """Fail early, with the expected tree, when data.root is not a folder."""
        if not self.root.is_dir():
            raise self.layout_error("the folder does not exist")

    def resolve_root(self) -> tuple[Path, str]:
        """The folder to read (extracting archives first if needed) and a sentence naming the layout."""
        raise NotImplementedError

    def read_splits(self, folder: Path) -> SplitSamples:
        """Parse the dataset in ``folder`` into samples per split."""
        raise NotImplementedError

    def make_dataset(self, samples: list[tuple[str, int]], transform: Callable) -> ImageSampleDataset:
        """The dataset of one split; subclasses override to change how an image is loaded."""
        return ImageSampleDataset(samples, transform, self.skip_corrupt)

    def prepare_data(self) -> None:
        """Extract archives into the cache once (Lightning calls this on one process per node)."""
        self.resolve_root()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.skip_corrupt:
            attach_skipped_report(self)
        if self.train_set is not None:
            return
        folder, self.layout = self.resolve_root()
        splits = self.read_splits(folder)
        if len(splits.class_names) != self.num_classes:
            raise ValueError(
                f"data.num_classes={self.num_classes} but {self.root} holds {len(splits.class_names)} classes; "
                f"set data.num_classes={len(splits.class_names)} or point data.root at the full dataset"
            )
        for split in ("train", "val", "test"):
            if not getattr(splits, split):
                raise ValueError(f"{self.dataset_name} in {self.root}: the {split} split is empty; check the dataset")
        self.class_names = splits.class_names
        self.expected_sizes = splits.expected_sizes
        self.train_set = self.make_dataset(splits.train, self.train_transform)
        self.val_set = self.make_dataset(splits.val, self.eval_transform)
        self.test_set = self.val_set if splits.test is splits.val else self.make_dataset(splits.test, self.eval_transform)
        log.info(
            "%s: %s; %d classes; train %d, val %d, test %d images",
            self.dataset_name, self.layout, self.num_classes, len(splits.train), len(splits.val), len(splits.test),
        )
