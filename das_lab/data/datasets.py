"""Dataset classes shared by the das-lab image datamodules.

Corrupt-file policy (``data.skip_corrupt``): by default the first corrupt file stops the run with
its path. With ``skip_corrupt=true`` the dataset returns the next readable sample instead and
flags the bad index in a shared-memory mask (visible across DataLoader workers);
:class:`das_lab.callbacks.skipped_images.SkippedImagesReport` logs the count and the paths at the
end of every train/validation/test epoch and clears the mask.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from das_lab.data.decode import CorruptImageError, read_rgb


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
