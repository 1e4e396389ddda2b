"""Loader plumbing shared by every das-lab datamodule."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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
        sampler = EpochSeededSampler(len(dataset), torch.initial_seed()) if shuffle else self._eval_sampler(dataset)
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
