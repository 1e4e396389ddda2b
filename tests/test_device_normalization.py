"""data.normalize_on: uint8 batches normalised (and erased) after transfer equal the worker-normalised ones."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from das_lab.cli import data_main
from das_lab.data.datamodule import resolve_normalize_on
from das_lab.data.imagenet import ImageNetDataModule
from das_lab.data.transforms import BatchNormalize, TimmPILTransform, build_train_transform
from das_lab.errors import ConfigError
from fake_datasets import make_imagenet_folders

RANDAUGMENT = {"hflip": 0.5, "auto_augment": "rand-m9-mstd0.5-inc1", "interpolation": "bicubic"}


def imagenet(root: Path, normalize_on: str, augment: dict[str, Any], data_format: str = "folder") -> ImageNetDataModule:
    """The fake ImageNet at 16 px (folders or shards), set up under a CPU trainer (as `das-lab train` attaches one)."""
    datamodule = ImageNetDataModule(
        root=str(root),
        format=data_format,
        cache_dir=str(root.parent / "cache"),
        image_size=16,
        num_classes=4,
        max_per_class=None,
        verify_md5=False,
        train_augment=augment,
        crop_pct=0.875,
        eval_interpolation="bicubic",
        skip_corrupt=False,
        batch_size=6,
        num_workers=0,
        normalize_on=normalize_on,
    )
    datamodule.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    datamodule.setup("fit")
    return datamodule


def seeded_batch(datamodule: ImageNetDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch of a split's loader, every random generator seeded alike first (same order, same draws)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return next(iter(getattr(datamodule, f"{split}_dataloader")()))


def after_transfer(datamodule: ImageNetDataModule, batch: Any, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the trainer hands the module: the datamodule's hook applied in the training or validation stage."""
    if training:
        datamodule.trainer.training = True
    else:
        datamodule.trainer.validating = True
    return datamodule.on_after_batch_transfer(batch, 0)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    return make_imagenet_folders(tmp_path_factory.mktemp("device_norm") / "imagenet")


def assert_device_batches_equal_worker_batches(workers, device) -> None:
    """Train and val batches normalised after transfer equal the worker-normalised ones, bit for bit."""
    for split in ("train", "val"):
        expected_images, expected_labels = seeded_batch(workers, split)
        uint8_batch = seeded_batch(device, split)
        assert uint8_batch[0].dtype == torch.uint8
        images, labels = after_transfer(device, uint8_batch, training=split == "train")
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_batches_normalised_after_transfer_equal_the_worker_normalised_ones(imagenet_root):
    workers, device = (imagenet(imagenet_root, option, RANDAUGMENT) for option in ("workers", "device"))
    assert (workers.normalized_on, device.normalized_on) == ("workers", "device")
    assert device.train_set[0][0].dtype == torch.uint8 and workers.train_set[0][0].dtype == torch.float32
    assert_device_batches_equal_worker_batches(workers, device)
    # the public transforms stay whole for readers without a trainer (visualize, predict)
    assert device.eval_transform(torch.zeros(3, 20, 24, dtype=torch.uint8)).dtype == torch.float32


def test_erasing_after_transfer_only_in_training(imagenet_root):
    workers = imagenet(imagenet_root, "workers", RANDAUGMENT)
    erasing = imagenet(imagenet_root, "device", {**RANDAUGMENT, "re_prob": 1.0, "re_mode": "pixel"})
    images, _ = after_transfer(erasing, seeded_batch(erasing, "val"), training=False)
    assert torch.equal(images, seeded_batch(workers, "val")[0])
    uint8_images, labels = seeded_batch(erasing, "train")
    erased, _ = after_transfer(erasing, (uint8_images, labels), training=True)
    unerased = BatchNormalize()(uint8_images)
    changed = (erased != unerased).any(dim=1).flatten(1).float().mean(dim=1)
    assert (changed > 0.01).all() and (changed < 0.5).all()  # each image: one box of 2-33% of its area


def test_pil_fallback_recipe_stops_at_uint8_and_matches_timm_normalisation(imagenet_root):
    hue = {"hflip": 0.5, "color_jitter": [0.4, 0.4, 0.4, 0.1]}  # hue jitter: timm's PIL pipeline
    workers, device = (imagenet(imagenet_root, option, hue) for option in ("workers", "device"))
    assert isinstance(device.train_set.transform, TimmPILTransform)
    expected, _ = seeded_batch(workers, "train")
    uint8_batch = seeded_batch(device, "train")
    assert uint8_batch[0].dtype == torch.uint8
    images, _ = after_transfer(device, uint8_batch, training=True)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)  # timm's ToTensor divides, ToDtype multiplies


def test_litdata_shards_normalise_after_transfer_alike(imagenet_root, tmp_path):
    out = tmp_path / "shards"
    convert = ["convert", "data=imagenet", f"data.root={imagenet_root}", "data.num_classes=4", f"out={out}"]
    assert data_main([*convert, "num_workers=1", f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    workers, device = (imagenet(out, option, RANDAUGMENT, "litdata") for option in ("workers", "device"))
    assert device.normalized_on == "device" and device.val_set.image_transform is not device.eval_transform
    assert_device_batches_equal_worker_batches(workers, device)


def visible_boxes(image: torch.Tensor, background: torch.Tensor) -> tuple[int, float]:
    """(erase boxes seen, erased fraction) of a solid image erased in 'rand' mode: each box has its own colour."""
    erased = (image != background).any(dim=0)
    colours = {tuple(pixel.tolist()) for pixel in image.permute(1, 2, 0)[erased]}
    return len(colours), erased.float().mean().item()


def test_batched_erasing_draws_like_timm_in_the_workers():
    augment = {"scale": [0.5, 1.0], "hflip": 0.5, "re_prob": 0.5, "re_mode": "rand", "re_count": 3}
    solid = torch.tensor([40, 128, 200], dtype=torch.uint8).view(3, 1, 1).expand(3, 20, 24)
    background = BatchNormalize()(solid[None, :, :1, :1].contiguous())[0]
    count = 3000
    random.seed(1)
    torch.manual_seed(1)
    per_image = build_train_transform(16, augment)
    in_workers = [visible_boxes(per_image(solid), background) for _ in range(count)]
    crop = build_train_transform(16, augment, normalize=False)
    batches = [torch.stack([crop(solid) for _ in range(500)]) for _ in range(count // 500)]
    on_device = [visible_boxes(image, background) for batch in batches for image in BatchNormalize(augment)(batch)]
    summaries = []
    for draws in (in_workers, on_device):
        boxes = Counter(n for n, _ in draws)
        erased = count - boxes[0]
        summaries.append(
            (erased / count, [boxes[n] / erased for n in (1, 2, 3)], sum(f for n, f in draws if n) / erased)
        )
    (workers_rate, workers_counts, workers_area), (device_rate, device_counts, device_area) = summaries
    assert abs(workers_rate - 0.5) < 0.04 and abs(device_rate - workers_rate) < 0.04
    assert all(abs(a - b) < 0.06 for a, b in zip(workers_counts, device_counts))
    assert workers_counts[0] > 0.2 and workers_counts[2] > 0.2  # one to three boxes, each drawn about as often
    assert abs(device_area - workers_area) < 0.1 * workers_area


@pytest.mark.parametrize("height, width", [(1, 1), (1, 9), (9, 1), (2, 3), (5, 5)])
def test_batched_erasing_survives_edge_sizes(height, width):
    images = torch.randint(0, 256, (4, 3, height, width), dtype=torch.uint8)
    for mode in ("const", "rand", "pixel"):
        out = BatchNormalize({"re_prob": 1.0, "re_mode": mode, "re_count": 3})(images)
        assert out.shape == (4, 3, height, width) and out.dtype == torch.float32 and out.isfinite().all()


def test_option_values_and_where_auto_normalises(imagenet_root):
    with pytest.raises(ConfigError, match=r"^data.normalize_on=gpu: expected one of auto, workers, device \("):
        imagenet(imagenet_root, "gpu", RANDAUGMENT)
    with pytest.raises(TypeError, match="uint8 batches"):
        BatchNormalize()(torch.zeros(2, 3, 4, 4))
    assert resolve_normalize_on("auto", torch.device("cuda", 0)) == "device"
    assert resolve_normalize_on("auto", torch.device("cpu")) == "workers"
    assert resolve_normalize_on("device", None) == "workers"  # no trainer, no transfer: datasets normalise
    auto = imagenet(imagenet_root, "auto", RANDAUGMENT)
    assert auto.normalized_on == "workers" and not auto.batch_transforms
    assert auto.train_set[0][0].dtype == torch.float32


def test_normalising_constants_are_timms():
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(BatchNormalize()(images), (images / 255 - mean) / std)
