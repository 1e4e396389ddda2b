"""Images/s of reading + decoding + the train transform: ImageNet folders vs the same images as LitData shards.

Usage: python benchmarks/data_formats.py [--images 256] [--size 224] [--reps 3]
Generates 500x375 JPEGs in the ImageNet folder layout, converts them with ``das-lab data convert``,
then times full passes of the imagenet datamodule's training loader (recipe=basic, batch 32) for
``data.format=folder`` and ``data.format=litdata`` with 1 and 2 loader workers: one warm-up pass
each, then ``--reps`` rounds that alternate the formats; the median rate is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from data_pipeline import make_jpegs
from hydra.utils import instantiate

from das_lab.data.convert import main as convert_main
from das_lab.data.verify import compose_config

FORMATS = ("folder", "litdata")


def datamodule(root: Path, data_format: str, workers: int, size: int):
    """The imagenet datamodule on ``root`` in ``data_format``, set up."""
    cfg = compose_config(
        [
            "data=imagenet",
            f"data.root={root}",
            f"data.format={data_format}",
            "data.num_classes=2",
            f"data.image_size={size}",
            "data.batch_size=32",
            f"data.num_workers={workers}",
            "data.persistent_workers=false",
            "data.pin_memory=false",
        ]
    )
    module = instantiate(cfg.data)
    module.setup()
    return module


def one_pass(loader) -> float:
    """Images/s of one pass over ``loader``."""
    start, images = time.perf_counter(), 0
    for batch, _ in loader:
        images += len(batch)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folders, shards = Path(tmp) / "imagenet", Path(tmp) / "shards"
        make_jpegs(folders / "train", args.images)
        make_jpegs(folders / "val", 4)
        assert (
            convert_main(
                [
                    "data=imagenet",
                    f"data.root={folders}",
                    "data.num_classes=2",
                    f"out={shards}",
                    "num_workers=2",
                    "chunk_bytes=8MB",
                    f"hydra.run.dir={Path(tmp) / 'run'}",
                ]
            )
            == 0
        )
        roots = {"folder": folders, "litdata": shards}
        rows = []
        for workers in (1, 2):
            loaders = {fmt: datamodule(roots[fmt], fmt, workers, args.size).train_dataloader() for fmt in FORMATS}
            for loader in loaders.values():
                one_pass(loader)
            rates: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
            for _ in range(args.reps):
                for fmt in FORMATS:
                    rates[fmt].append(one_pass(loaders[fmt]))
            folder, litdata = (statistics.median(rates[fmt]) for fmt in FORMATS)
            rows.append(f"| {workers} | {folder:.1f} | {litdata:.1f} | {litdata / folder:.2f} |")
    print(f"{args.images} JPEGs 500x375 -> train transform at {args.size} px, batch 32, median of {args.reps} passes")
    print("| loader workers | folder img/s | litdata img/s | litdata / folder |")
    print("|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
