"""Images/s per worker: das-lab's tensor pipelines vs timm's PIL pipelines on the same JPEGs, per recipe.

Usage: python benchmarks/data_pipeline.py [--images 200] [--repeats 5] [--size 224] [--stages]
Generates a folder of 500x375 JPEGs, then times whole passes over it in one process with one thread
(the rate of one DataLoader worker), after a warm-up pass. The passes are interleaved: every round
times each pipeline once, in an order that rotates from round to round, so that a machine shared with
other work slows every pipeline alike; the table gives the median rate over the rounds, and each ratio
is the median of the per-round ratios, by wall time and by the process's CPU time (the steadier of
the two on a shared machine). ``--stages`` adds where the time of one image goes in the
dat_paper pipelines (decode, crop + flip, RandAugment, to float + normalise + erasing).
dat_paper is also timed ending at the uint8 tensor, as a worker runs it with ``data.normalize_on=device``
(smaller batches through the pipe too: collation is part of each pass), and the batched step that then
runs after transfer (``BatchNormalize``: to float, normalise, erase) is timed on uint8 batches in this
process on the CPU, with one thread and with all of torch's threads (on a GPU that step is a few kernels).
timm's PIL posterize at 0 bits (drawn at magnitude 10 by rand-m9-mstd0.5-inc1) raises in Pillow >= 12,
so timm's RandAugment runs here with das-lab's posterize (``use_safe_posterize``), as das-lab's own
PIL fallback does; that op is as cheap as Pillow's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from das_lab.data.datasets import ImageSampleDataset
from das_lab.data.decode import read_rgb
from das_lab.data.transforms import (
    BatchNormalize,
    TimmPILTransform,
    build_eval_transform,
    build_train_transform,
    use_safe_posterize,
)

BASIC = {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333333], "hflip": 0.5, "interpolation": "bilinear"}
DAT_PAPER = {
    "scale": [0.08, 1.0],
    "ratio": [0.75, 1.3333333],
    "hflip": 0.5,
    "vflip": 0.0,
    "color_jitter": 0.4,
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "interpolation": "bicubic",
    "re_prob": 0.25,
    "re_mode": "pixel",
    "re_count": 1,
}  # conf/recipe/dat_paper.yaml's data.train_augment


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


def seconds_per_pass(dataset: Dataset) -> tuple[float, float]:
    """Wall and CPU time of one pass of a single-process DataLoader (batch 32) over ``dataset``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in DataLoader(dataset, batch_size=32, num_workers=0):
        pass
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_rates(pipelines: dict[str, Dataset], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Images/s (by wall and by CPU time) of every pipeline in each of ``repeats`` rounds; each round
    times every pipeline once, in an order rotated from round to round."""
    names = list(pipelines)
    for name in names:  # warm-up: file cache, lazy imports, allocator
        seconds_per_pass(pipelines[name])
    rates: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in names} for clock in ("wall", "cpu")}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for clock, seconds in zip(("wall", "cpu"), seconds_per_pass(pipelines[name])):
                rates[clock][name].append(len(pipelines[name]) / seconds)
    return rates


def median_ratio(rates: dict[str, list[float]], faster: str, slower: str) -> tuple[float, float, float]:
    """Median, min and max over the rounds of the per-round rate ratio ``faster / slower``."""
    ratios = [a / b for a, b in zip(rates[faster], rates[slower])]
    return statistics.median(ratios), min(ratios), max(ratios)


def _mean_ms(step: Callable[[Any], Any], inputs: list[Any]) -> tuple[float, list[Any]]:
    outputs, times = [], []
    for item in inputs:
        start = time.process_time()
        outputs.append(step(item))
        times.append(time.process_time() - start)
    return 1e3 * sum(times) / len(times), outputs


def stage_times(samples: list[tuple[str, int]], size: int) -> dict[str, list[float]]:
    """Mean CPU ms per image of each stage of the dat_paper pipelines, das-lab (tensor) and timm (PIL)."""
    das = build_train_transform(size, DAT_PAPER).transforms
    timm_steps = use_safe_posterize(create_transform(size, is_training=True, **DAT_PAPER)).transforms
    paths = [path for path, _ in samples]
    das_stages = {
        "decode": read_rgb,
        "crop + flip": lambda image: das[1](das[0](image)),
        "RandAugment": das[2],
        "to float, normalise, erase": lambda image: das[5](das[4](das[3](image))),
    }
    timm_stages = {
        "decode": lambda path: Image.open(path).convert("RGB"),
        "crop + flip": lambda image: timm_steps[1](timm_steps[0](image)),
        "RandAugment": timm_steps[2],
        "to float, normalise, erase": lambda image: timm_steps[5](timm_steps[4](timm_steps[3](image))),
    }
    table: dict[str, list[float]] = {stage: [] for stage in das_stages}
    for stages in (das_stages, timm_stages):
        data: list[Any] = paths
        for stage, step in stages.items():
            ms, data = _mean_ms(step, data)
            table[stage].append(ms)
    return table


def batch_normalize_ms(size: int, batch: int, rounds: int, threads: int) -> dict[str, tuple[float, float, float]]:
    """Wall ms per image (median, min, max over ``rounds`` batches) of ``BatchNormalize`` on a uint8 batch,
    training (dat_paper's erasing) and eval, with ``threads`` torch threads in this process."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    steps = {"train": BatchNormalize(DAT_PAPER), "eval": BatchNormalize()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(rounds + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step(images)
            if round_index:  # the first round warms up
                times[name].append(1e3 * (time.perf_counter() - start) / batch)
    torch.set_num_threads(saved)
    return {name: (statistics.median(ms), min(ms), max(ms)) for name, ms in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--stages", action="store_true", help="also time each stage of the dat_paper pipelines")
    parser.add_argument("--batch", type=int, default=128, help="batch size of the batched normalise + erase")
    args = parser.parse_args()
    all_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread; measure the same here
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_jpegs(Path(tmp), args.images)
        pipelines = {
            "train dat_paper  das-lab: torchvision.io decode + tensor RandAugment/erasing": ImageSampleDataset(
                samples, build_train_transform(args.size, DAT_PAPER), False
            ),
            "train dat_paper  timm: PIL + create_transform(same recipe)": ImageFolder(
                tmp, transform=use_safe_posterize(create_transform(args.size, is_training=True, **DAT_PAPER))
            ),
            "train dat_paper  das-lab's PIL fallback (the path before tensor RandAugment)": ImageSampleDataset(
                samples,
                TimmPILTransform(
                    create_transform(args.size, is_training=True, **DAT_PAPER), "benchmark: the earlier dat_paper path"
                ),
                False,
            ),
            "train basic      das-lab: torchvision.io decode + v2 crop/flip": ImageSampleDataset(
                samples, build_train_transform(args.size, BASIC), False
            ),
            "train basic      timm: PIL + create_transform(crop + flip only)": ImageFolder(
                tmp, transform=create_transform(args.size, is_training=True, color_jitter=None, **BASIC)
            ),
            "eval             das-lab: torchvision.io decode + v2 resize/centre crop": ImageSampleDataset(
                samples, build_eval_transform(args.size, 0.875, "bilinear"), False
            ),
            "eval             timm: PIL + create_transform(is_training=False)": ImageFolder(
                tmp, transform=create_transform(args.size, is_training=False)
            ),
            "train dat_paper  das-lab, ending at uint8 (data.normalize_on=device)": ImageSampleDataset(
                samples, build_train_transform(args.size, DAT_PAPER, normalize=False), False
            ),
        }
        rates = interleaved_rates(pipelines, args.repeats)
        stages = stage_times(samples[: min(len(samples), 100)], args.size) if args.stages else {}
    batched = {threads: batch_normalize_ms(args.size, args.batch, 20, threads) for threads in sorted({1, all_threads})}
    names = list(pipelines)
    width = max(map(len, names))
    print(f"{args.images} JPEGs 500x375 -> {args.size}px, one process, 1 thread, {args.repeats} interleaved rounds")
    print(f"{'pipeline'.ljust(width)}  img/s by wall time: median (min - max)  |  by CPU time")
    for name in names:
        wall, cpu = rates["wall"][name], rates["cpu"][name]
        print(
            f"{name.ljust(width)}  {statistics.median(wall):7.1f} ({min(wall):.1f} - {max(wall):.1f})"
            f"  |  {statistics.median(cpu):7.1f} ({min(cpu):.1f} - {max(cpu):.1f})"
        )
    print()
    pairs = {"train dat_paper": (0, 1), "dat_paper PIL fallback": (2, 1), "train basic": (3, 4), "eval": (5, 6)}
    for label, (das, timm) in pairs.items():
        for clock in ("wall", "cpu"):
            ratio, low, high = median_ratio(rates[clock], names[das], names[timm])
            print(f"{label:22s} das-lab / timm by {clock} time: {ratio:.2f}x (per-round {low:.2f} - {high:.2f})")
    for clock in ("wall", "cpu"):
        ratio, low, high = median_ratio(rates[clock], names[7], names[0])
        print(
            f"dat_paper worker ending at uint8 / at normalised + erased float by {clock} time: {ratio:.2f}x "
            f"(per-round {low:.2f} - {high:.2f})"
        )
    print(
        f"\nafter transfer, BatchNormalize on uint8 batches of {args.batch}x3x{args.size}x{args.size} on the CPU, "
        "wall ms per image: median (min - max) over 20 batches"
    )
    for threads, steps in batched.items():
        for name, (median, low, high) in steps.items():
            what = "to float, normalise, erase (dat_paper)" if name == "train" else "to float, normalise (eval)"
            print(f"  {threads} thread(s)  {what:40s} {median:.3f} ({low:.3f} - {high:.3f})")
    if stages:
        print("\ndat_paper, mean CPU ms per image by stage (das-lab tensor | timm PIL):")
        for stage, (das_ms, timm_ms) in stages.items():
            print(f"  {stage:28s} {das_ms:7.3f} | {timm_ms:7.3f}")


if __name__ == "__main__":
    main()
