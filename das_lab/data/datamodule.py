"""The datamodule base classes: loaders configured from YAML, and the shared image-classification plumbing.

``DataModuleBase`` turns the datasets a subclass builds into loaders (epoch-seeded shuffling,
unpadded distributed evaluation). ``ImageClassificationDataModule`` adds what every image-folder
dataset shares: recipe transforms, the corrupt-file policy (``data.skip_corrupt``, reported by
:class:`das_lab.callbacks.skipped_images.SkippedImagesReport`), layout errors and split checks, and
where images are normalised (``data.normalize_on``): in the loader workers, per image, or on the
whole batch after it reached the trainer's device (uint8 batches cross the worker pipes and the
host-to-device copy: a quarter of float32's bytes, and the workers skip conversion, normalisation
and erasing). ``auto`` picks the device on a CUDA GPU, where that work costs next to nothing; on a
CPU it would move work from the parallel workers into the training process, so ``auto`` keeps it in
the workers there. Only a trainer transfers batches: without one (data verify, or code reading the
datasets) the datasets give normalised images whatever the option says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler

from das_lab.data.datasets import ImageSampleDataset
from das_lab.data.transforms import (
    BatchNormalize,
    Transform,
    build_eval_transform,
    build_train_transform,
    normalize_augment,
)
from das_lab.errors import ConfigError
from das_lab.utils.seeding import run_seed

log = logging.getLogger(__name__)


NORMALIZE_ON = ("auto", "workers", "device")


def check_normalize_on(option: str) -> str:
    """Refuse a ``data.normalize_on`` value other than auto, workers or device."""
    if option not in NORMALIZE_ON:
        raise ConfigError(
            f"data.normalize_on={option}: expected one of {', '.join(NORMALIZE_ON)} "
            "(device: normalise whole batches after transfer; auto: device on a CUDA GPU, workers otherwise)"
        )
    return option


def resolve_normalize_on(option: str, root_device: Optional[torch.device]) -> str:
    """Where images are normalised: ``device`` (batches, after transfer) or ``workers`` (each image in the loader).

    ``root_device`` is the trainer's (None without a trainer: nothing transfers batches then, so the
    datasets must give normalised images).
    """
    if root_device is None:
        return "workers"
    if option == "auto":
        return "device" if root_device.type == "cuda" else "workers"
    return option


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a permutation fixed by (seed, epoch).

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint sees the
    same order as an uninterrupted one, whatever else drew random numbers before.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**63)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class DataModuleBase(L.LightningDataModule):
    """Turns the datasets a subclass builds in ``setup`` into loaders configured from YAML.

    Subclasses set ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``setup`` and
    expose ``num_classes`` and ``class_names``.
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: Optional[int] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size}: expected a positive integer")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers}: expected 0 or more")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self.class_names: list[str] = []

    def collate_fn(self) -> Optional[Callable[[list[Any]], Any]]:
        """Batch collation; ``None`` means PyTorch's default (stacking)."""
        return None

    @staticmethod
    def _eval_sampler(dataset: Dataset) -> Optional[Sampler]:
        """Under DDP, split evaluation data without padding, so every image counts exactly once."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return UnrepeatedDistributedSampler(dataset, shuffle=False)
        return None

    def _loader(self, dataset: Optional[Dataset], shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader")
        sampler = EpochSeededSampler(len(dataset), run_seed()) if shuffle else self._eval_sampler(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=shuffle and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
            collate_fn=self.collate_fn(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


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
    ``crop_pct`` and ``eval_interpolation``. ``train_transform`` and ``eval_transform`` always end
    in normalised float images (visualize and predict use them); the datasets run them whole, or up
    to the uint8 tensor when ``setup`` decides to normalise on the device (``normalize_on``).
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
        normalize_on: str = "auto",
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
        self.normalize_on = check_normalize_on(normalize_on)
        self.normalized_on = "workers"  # decided in setup, once a trainer may be attached
        self.batch_transforms: dict[str, BatchNormalize] = {}
        self.layout = ""
        self.expected_sizes: dict[str, int] = {}

    def eval_data_config(self) -> dict[str, Any]:
        """The eval preprocessing in timm's terms (exported models' pretrained_cfg)."""
        return {
            "input_size": (3, self.image_size, self.image_size),
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "crop_pct": self.crop_pct,
            "interpolation": self.eval_interpolation,
        }

    def dataset_transforms(self) -> tuple[Transform, Transform]:
        """Decide where images are normalised; the (train, eval) transforms the datasets run accordingly."""
        root_device = self.trainer.strategy.root_device if self.trainer is not None else None
        self.normalized_on = resolve_normalize_on(self.normalize_on, root_device)
        where = "per image in the loader workers" if self.normalized_on == "workers" else "per batch after transfer"
        log.info("data.normalize_on=%s: images are normalised %s", self.normalize_on, where)
        if self.normalized_on == "workers":
            self.batch_transforms = {}
            return self.train_transform, self.eval_transform
        self.batch_transforms = {"train": BatchNormalize(self.train_augment), "eval": BatchNormalize()}
        return (
            build_train_transform(self.image_size, self.train_augment, normalize=False),
            build_eval_transform(self.image_size, self.crop_pct, self.eval_interpolation, normalize=False),
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``normalize_on`` resolved to device: normalise (and in training erase) the uint8 batch on its device."""
        if not self.batch_transforms:
            return batch
        images, labels = batch
        images = self.batch_transforms["train" if self.trainer.training else "eval"](images)
        # Lightning casts float inputs for true-half precision before the transfer, when these were still uint8
        return self.trainer.precision_plugin.convert_input(images), labels

    def layout_error(self, detail: str) -> FileNotFoundError:
        """The one setup error for a missing or misplaced dataset: what is wrong, the expected tree, where to get it."""
        if self.root.is_dir():
            detail = f"{detail} (found {sorted(p.name for p in self.root.iterdir())[:10]})"
        return FileNotFoundError(
            f"{self.title} not found in data.root={self.root}: {detail}. Expected:\n{self.expected_tree}"
        )

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
        train_transform, eval_transform = self.dataset_transforms()
        self.train_set = self.make_dataset(splits.train, train_transform)
        self.val_set = self.make_dataset(splits.val, eval_transform)
        self.test_set = self.val_set if splits.test is splits.val else self.make_dataset(splits.test, eval_transform)
        log.info(
            "%s: %s; %d classes; train %d, val %d, test %d images",
            self.dataset_name,
            self.layout,
            self.num_classes,
            len(splits.train),
            len(splits.val),
            len(splits.test),
        )
