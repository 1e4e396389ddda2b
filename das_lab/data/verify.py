"""`das-lab data verify [--max-images N] data=<name> data.root=...`: check a dataset before training on it.

Composes the same config as ``das-lab train`` with the given overrides, builds the datamodule and
checks the layout, the class count, the split sizes (against the official release when the config
asks for the full dataset) and that every image decodes. With ``data.format=litdata`` it checks
converted shards the same way: their metadata (an interrupted conversion, other classes), the
record counts against the conversion's, and that every record decodes. Prints a summary table;
exits 0 when all is well, 1 on any problem.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset

from das_lab.config import config_dir
from das_lab.data.ade20k import ADE20KDataModule
from das_lab.data.datamodule import ImageClassificationDataModule
from das_lab.data.datasets import ImageSampleDataset
from das_lab.data.decode import CorruptImageError

SHOWN_UNREADABLE = 20
# what a dataset or its config can be wrong with; anything else is a bug and keeps its traceback
INPUT_ERRORS = (FileNotFoundError, ValueError, CorruptImageError)


class _DecodeProbe(Dataset):
    """Decodes the images of a split at chosen indices; yields the error text, '' when readable."""

    def __init__(self, dataset: ImageSampleDataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> str:
        try:
            self.dataset.load_image(self.indices[position])
        except CorruptImageError as error:
            return str(error)
        return ""


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The training config with these overrides, as ``das-lab train`` would compose it."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def config_error_line(error: Exception) -> str:
    """One line for an override Hydra cannot compose (a group option or key that does not exist)."""
    if isinstance(error, MissingConfigException) and error.options:
        group = (error.missing_cfg_file or "").rsplit("/", 1)[0]
        return f"{str(error).splitlines()[0]}; choose {group}= one of: {', '.join(error.options)}"
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def unreadable_images(
    dataset: ImageSampleDataset, max_images: Optional[int], num_workers: int
) -> tuple[int, list[str]]:
    """How many images were decoded (evenly spread when capped) and the errors of those that failed."""
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = sorted({i * len(dataset) // count for i in range(count)}) if count else []
    loader = DataLoader(_DecodeProbe(dataset, indices), batch_size=None, num_workers=num_workers)
    return len(indices), [error for error in loader if error]


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("check", "found", "expected", "status")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def verify(
    datamodule: ImageClassificationDataModule | ADE20KDataModule, max_images: Optional[int]
) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Summary rows and the problems found in a datamodule's dataset."""
    datamodule.prepare_data()
    datamodule.setup()
    rows = [
        ("layout", datamodule.layout, "", "ok"),
        ("classes", str(len(datamodule.class_names)), str(datamodule.num_classes), "ok"),
    ]
    problems: list[str] = []
    if isinstance(datamodule, ImageClassificationDataModule):  # one class per image: each class needs images
        empty_classes = sorted(set(range(datamodule.num_classes)) - set(datamodule.train_set.targets))
        if empty_classes:
            names = [datamodule.class_names[i] for i in empty_classes[:5]]
            problems.append(f"{len(empty_classes)} classes have no training image (e.g. {names})")
        rows.append(
            ("classes without train images", str(len(empty_classes)), "0", "PROBLEM" if empty_classes else "ok")
        )
    checked: dict[int, str] = {}
    for split in ("train", "val", "test"):
        dataset = getattr(datamodule, f"{split}_set")
        expected = datamodule.expected_sizes.get(split)
        status = "ok" if expected is None or expected == len(dataset) else "PROBLEM"
        if status != "ok":
            problems.append(f"{split} split has {len(dataset)} images; the official release has {expected}")
        rows.append((f"{split} images", str(len(dataset)), "-" if expected is None else str(expected), status))
        if id(dataset) in checked:
            rows.append((f"{split} unreadable", "same images as " + checked[id(dataset)], "", "ok"))
            continue
        checked[id(dataset)] = split
        decoded, errors = unreadable_images(dataset, max_images, datamodule.num_workers)
        problems.extend(errors)
        rows.append((f"{split} unreadable", f"{len(errors)} of {decoded} decoded", "0", "PROBLEM" if errors else "ok"))
    return rows, problems


def main(argv: list[str]) -> int:
    """Entry point of `das-lab data verify`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="das-lab data verify", description=__doc__.splitlines()[0])
    parser.add_argument("--max-images", type=int, default=None, help="decode at most N images per split (default: all)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=stanford_dogs data.root=/data/dogs")
    args = parser.parse_args(argv)
    try:
        cfg = compose_config(args.overrides)
    except (HydraException, OmegaConfBaseException) as error:
        print(f"data verify: {config_error_line(error)}", file=sys.stderr)
        return 1
    try:
        datamodule = instantiate(cfg.data)
        if not isinstance(datamodule, (ImageClassificationDataModule, ADE20KDataModule)):
            print(
                f"data verify: {cfg.data._target_} is not an image-folder dataset; choose data=stanford_dogs, imagenet or ade20k",
                file=sys.stderr,
            )
            return 1
        rows, problems = verify(datamodule, args.max_images)
    except (FileNotFoundError, ValueError, CorruptImageError, InstantiationException) as error:
        # a datamodule constructor refusing a config value reaches us wrapped by Hydra
        problem = error.__cause__ if isinstance(error, InstantiationException) else error
        if not isinstance(problem, INPUT_ERRORS):
            raise
        print(f"data verify: FAILED\n{problem}", file=sys.stderr)
        return 1
    print(_table(rows))
    if problems:
        print(f"\ndata verify: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems[:SHOWN_UNREADABLE]:
            print(f"  {problem}", file=sys.stderr)
        if len(problems) > SHOWN_UNREADABLE:
            print(f"  ... and {len(problems) - SHOWN_UNREADABLE} more", file=sys.stderr)
        return 1
    print("\ndata verify: OK")
    return 0
