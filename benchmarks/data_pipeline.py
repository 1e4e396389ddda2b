"""Images/s per worker: das-lab's tensor pipeline vs timm's default PIL pipeline on the same JPEGs.

Usage: python benchmarks/data_pipeline.py [--images 200] [--workers 0] [--size 224]
Generates a folder of 500x375 JPEGs, then times the best of two passes over it (after a warm-up
pass) for each pipeline, single-threaded; with --workers 0 everything runs in one process, i.e. the rate of one worker.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from das_lab.data.datasets import ImageSampleDataset
from das_lab.data.transforms import build_eval_transform, build_train_transform

BASIC = {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333333], "hflip": 0.5, "interpolation": "bilinear"}


def make_jpegs(folder: Path, count: int) -> list[tuple[str, int]]:
    """``count`` photo-like 500x375 JPEGs (smooth gradients plus noise) in two class folders."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    samples = []
    for i in range(count):
        base = np.stack([(x * (i % 7 + 1) + y) % 256, (y * 2 + i) % 256, (x + y * (i % 5)) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"class{i % 2}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        samples.append((str(path), i % 2))
    return samples


def images_per_second(dataset: Dataset, workers: int, passes: int = 2) -> float:
    """Best throughput of ``passes`` timed passes after a warm-up pass (shared machines are noisy)."""
    loader = DataLoader(dataset, batch_size=32, num_workers=workers)
    best = float("inf")
    for timed in range(passes + 1):
        start = time.perf_counter()
        for _ in loader:
            pass
        if timed:
            best = min(best, time.perf_counter() - start)
    return len(dataset) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread; measure the same here
    per_worker = max(args.workers, 1)
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_jpegs(Path(tmp), args.images)
        pipelines = {
            "train  das-lab: torchvision.io decode + v2 on uint8 tensors (recipe=basic)":
                ImageSampleDataset(samples, build_train_transform(args.size, BASIC), False),
            "train  timm default: PIL + create_transform(is_training=True) (+ colour jitter 0.4)":
                ImageFolder(tmp, transform=create_transform(args.size, is_training=True)),
            "train  timm, same ops: PIL + create_transform(crop + flip only)":
                ImageFolder(tmp, transform=create_transform(args.size, is_training=True, color_jitter=None, **BASIC)),
            "eval   das-lab: torchvision.io decode + v2 resize/centre crop":
                ImageSampleDataset(samples, build_eval_transform(args.size, 0.875, "bilinear"), False),
            "eval   timm default: PIL + create_transform(is_training=False)":
                ImageFolder(tmp, transform=create_transform(args.size, is_training=False)),
        }
        rates = {name: images_per_second(dataset, args.workers) / per_worker for name, dataset in pipelines.items()}
    names = list(rates)
    width = max(map(len, names))
    print(f"{args.images} JPEGs 500x375 -> {args.size}px, workers={args.workers}")
    print(f"{'pipeline'.ljust(width)}  images/s/worker")
    for name in names:
        print(f"{name.ljust(width)}  {rates[name]:8.1f}")
    print(f"\ntrain ratio das-lab / timm default:  {rates[names[0]] / rates[names[1]]:.2f}x")
    print(f"train ratio das-lab / timm same ops: {rates[names[0]] / rates[names[2]]:.2f}x")
    print(f"eval  ratio das-lab / timm default:  {rates[names[3]] / rates[names[4]]:.2f}x")


if __name__ == "__main__":
    main()
