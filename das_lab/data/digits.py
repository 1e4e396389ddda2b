"""Cluttered digits: the embedded default dataset, real scans and no download.

scikit-learn ships the UCI handwritten digits (1,797 real 8x8 scans of 10 classes). Each scan
is upscaled and pasted at a random position of a larger canvas together with distractor
fragments cut from other scans of the same split. The salient object is small and far from
most pixels, the situation a deformable attention gate is made for, while a small network
still learns it on a CPU in minutes.

Splits are made per scan (a scan appears in one split only) and every canvas is determined by
``seed``, so two runs, or a run and ``das-lab eval`` of its checkpoint, see identical data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from das_lab.data.datamodule import DataModuleBase

_SCAN_SIZE = 8
_MEAN = 0.1
_STD = 0.25


class ClutteredDigits(Dataset):
    """Canvases stored as one uint8 tensor; items are normalised 3-channel float images."""

    def __init__(self, canvases: torch.Tensor, labels: torch.Tensor) -> None:
        self.canvases = canvases
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = (self.canvases[index].float() / 255.0 - _MEAN) / _STD
        return image.expand(3, -1, -1), int(self.labels[index])


def render_canvases(
    scans: torch.Tensor,
    labels: torch.Tensor,
    copies: int,
    image_size: int,
    digit_size: int,
    num_distractors: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``copies`` placements of every scan, with distractors, onto blank canvases.

    ``scans`` holds upscaled digits in [0, 1], shape (N, digit_size, digit_size). Distractors are
    square fragments (a quarter to a third of a digit's side) of other scans of the same set.
    """
    n = len(scans)
    total = n * copies
    canvases = torch.zeros(total, image_size, image_size)
    span = image_size - digit_size + 1
    positions = torch.randint(0, span, (total, 2), generator=generator)
    frag_sides = torch.randint(digit_size // 4, digit_size // 3 + 1, (total, num_distractors), generator=generator)
    frag_sources = torch.randint(0, n, (total, num_distractors), generator=generator)
    frag_uniform = torch.rand(total, num_distractors, 4, generator=generator)
    for i in range(total):
        canvas = canvases[i]
        for j in range(num_distractors):
            side = int(frag_sides[i, j])
            u = frag_uniform[i, j]
            sy, sx = int(u[0] * (digit_size - side + 1)), int(u[1] * (digit_size - side + 1))
            dy, dx = int(u[2] * (image_size - side + 1)), int(u[3] * (image_size - side + 1))
            fragment = scans[frag_sources[i, j], sy : sy + side, sx : sx + side]
            region = canvas[dy : dy + side, dx : dx + side]
            torch.maximum(region, fragment, out=region)
        y, x = int(positions[i, 0]), int(positions[i, 1])
        region = canvas[y : y + digit_size, x : x + digit_size]
        torch.maximum(region, scans[i % n], out=region)
    return (canvases * 255).round().to(torch.uint8).unsqueeze(1), labels.repeat(copies)


class DigitsDataModule(DataModuleBase):
    """The ``data=digits`` datamodule: cluttered 10-class digits built from scikit-learn's scans."""

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 64,
        digit_size: int = 24,
        num_distractors: int = 4,
        train_copies: int = 4,
        eval_copies: int = 2,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_classes: int = 10,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor)
        if num_classes != 10:
            raise ValueError(f"data.num_classes={num_classes}: the digits dataset has exactly 10 classes")
        if not _SCAN_SIZE <= digit_size <= image_size:
            raise ValueError(
                f"data.digit_size={digit_size} must lie between {_SCAN_SIZE} (the scans' size) and "
                f"data.image_size={image_size}"
            )
        if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be positive "
                "and sum to less than 1"
            )
        if min(train_copies, eval_copies) < 1 or num_distractors < 0:
            raise ValueError("data.train_copies and data.eval_copies must be >= 1 and data.num_distractors >= 0")
        self.image_size = image_size
        self.digit_size = digit_size
        self.num_distractors = num_distractors
        self.train_copies = train_copies
        self.eval_copies = eval_copies
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_classes = num_classes
        self.seed = seed
        self.class_names = [str(d) for d in range(10)]

    def eval_data_config(self) -> dict[str, Any]:
        """The eval preprocessing in timm's terms (exported models' pretrained_cfg); inputs are grayscale canvases."""
        return {
            "input_size": (3, self.image_size, self.image_size),
            "mean": (_MEAN,) * 3,
            "std": (_STD,) * 3,
            "crop_pct": 1.0,
            "interpolation": "bilinear",
        }

    def eval_transform(self, rgb: torch.Tensor) -> torch.Tensor:
        """Any uint8 RGB image -> a model input: grayscale, resized to ``image_size``, normalised like the canvases."""
        gray = (rgb.float() * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        size = (self.image_size, self.image_size)
        resized = F.interpolate(gray[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        canvas = resized.round().clamp(0, 255).to(torch.uint8)
        return ClutteredDigits(canvas[None], torch.zeros(1, dtype=torch.long))[0][0]

    def _split_indices(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Stratified split of the scans, fixed by ``seed``."""
        rng = np.random.default_rng(self.seed)
        parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for digit in range(10):
            idx = rng.permutation(np.flatnonzero(labels == digit))
            n_val = math.ceil(len(idx) * self.val_fraction)
            n_test = math.ceil(len(idx) * self.test_fraction)
            parts["val"] += idx[:n_val].tolist()
            parts["test"] += idx[n_val : n_val + n_test].tolist()
            parts["train"] += idx[n_val + n_test :].tolist()
        return {name: np.sort(np.asarray(ids)) for name, ids in parts.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        scans = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
        scans = F.interpolate(scans, size=(self.digit_size, self.digit_size), mode="bilinear", align_corners=False)
        scans = scans.clamp(0, 1).squeeze(1)
        labels = torch.from_numpy(digits.target).long()
        splits = self._split_indices(digits.target)
        datasets = {}
        for offset, (name, idx) in enumerate(splits.items()):
            generator = torch.Generator().manual_seed(self.seed * 1000 + offset)
            copies = self.train_copies if name == "train" else self.eval_copies
            canvases, targets = render_canvases(
                scans[idx], labels[idx], copies, self.image_size, self.digit_size, self.num_distractors, generator
            )
            datasets[name] = ClutteredDigits(canvases, targets)
        self.train_set, self.val_set, self.test_set = datasets["train"], datasets["val"], datasets["test"]
