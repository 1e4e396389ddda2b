"""``das-lab data convert data=imagenet|stanford_dogs data.root=DIR out=DIR_OR_URL``: write LitData shards.

The dataset is read exactly as training reads its folders (layout detection, archive extraction to
the cache, the ``data.num_classes`` subset, labels in the same class order); every image's file is
stored unchanged (no re-encoding) with its label and file name, in an order shuffled once by
``write_seed`` (so that every chunk mixes the classes), one LitData dataset per split,
written by ``litdata.optimize`` with ``num_workers`` processes and its progress bar. Each split
keeps LitData checkpoints while it is written: running the same command again after an
interruption skips the finished splits and continues the unfinished one. The metadata file
(das_lab_shards.json) is written last, so an interrupted conversion is never taken for a complete
one. Nothing is written into ``data.root``.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from das_lab.atomic_io import write_text_atomic
from das_lab.command import Outcome, Run, run_command
from das_lab.data.datamodule import ImageClassificationDataModule
from das_lab.data.litdata_shards import (
    INDEX_FILE,
    METADATA_FILE,
    METADATA_VERSION,
    SPLITS,
    is_url,
    join,
    object_store,
)
from das_lab.errors import ConfigError

log = logging.getLogger(__name__)


def read_record(sample: tuple[str, int, str]) -> dict[str, Any]:
    """One LitData record: the image file's bytes as stored on disk, its label and its relative name."""
    path, label, name = sample
    return {"image": Path(path).read_bytes(), "label": label, "path": name}


def check_out(out: str, root: Path) -> str:
    """The output location; refuses any place inside the dataset folder, which is only ever read."""
    if is_url(out):
        return out.rstrip("/")
    folder = Path(out).expanduser().absolute()
    source = root.expanduser().absolute()
    if folder == source or source in folder.parents:
        raise ConfigError(
            f"out={out} is inside data.root={root}; das-lab never writes into the dataset: choose another out"
        )
    if folder.is_file():
        raise ConfigError(f"out={out} is a file; give a folder (or an s3://, gs:// URL) for the shards")
    return str(folder)


def _exists(location: str) -> bool:
    if is_url(location):
        return object_store(location).exists(location)
    return Path(location).is_file()


def _write_text(location: str, text: str) -> None:
    """Write a small file locally (atomically) or upload it to the object store."""
    if not is_url(location):
        write_text_atomic(Path(location), text)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / Path(location).name
        local.write_text(text)
        object_store(location).upload_file(str(local), location)


def convert_split(
    samples: list[tuple[str, int]], folder: Path, location: str, num_workers: int, chunk_bytes: str, write_seed: int
) -> None:
    """Write one split's records with ``litdata.optimize``, resuming its checkpoints; skipped when finished.

    Records are written in an order shuffled by ``write_seed``: a chunk then mixes all classes, as the
    batches drawn from it (one chunk at a time per loader worker) must.
    """
    from litdata import optimize

    if _exists(join(location, INDEX_FILE)):
        log.info("%s: already converted, kept", location)
        return
    inputs = [(path, label, str(Path(path).relative_to(folder))) for path, label in samples]
    random.Random(write_seed).shuffle(inputs)
    log.info("%s: writing %d images with %d workers", location, len(inputs), num_workers)
    # the workers only read files: fork starts them at once, spawn would import torch again in each
    optimize(
        fn=read_record,
        inputs=inputs,
        output_dir=location,
        num_workers=num_workers,
        chunk_bytes=chunk_bytes,
        use_checkpoint=True,
        reorder_files=False,
        start_method="fork",
    )


def convert(cfg: DictConfig, run: Run) -> Outcome:
    """Convert ``cfg.data`` (read from its folders) into LitData shards at ``cfg.out``."""
    if cfg.data.get("format", "folder") != "folder":
        raise ConfigError(f"data.format={cfg.data.format}: data convert reads the folder form; drop data.format")
    datamodule = instantiate(cfg.data)
    if not isinstance(datamodule, ImageClassificationDataModule):
        choice = HydraConfig.get().runtime.choices.get("data")
        raise ConfigError(f"data={choice} cannot be converted to shards; choose data=imagenet or data=stanford_dogs")
    if cfg.num_workers < 1:
        raise ConfigError(f"num_workers={cfg.num_workers}: expected 1 or more conversion processes")
    out = check_out(str(cfg.out), datamodule.root)
    if _exists(join(out, METADATA_FILE)):
        raise ConfigError(f"out={out} already holds a complete conversion ({METADATA_FILE}); choose another out")
    folder, layout = datamodule.resolve_root()
    splits = datamodule.read_splits(folder)
    run.start()
    entries: dict[str, dict[str, Any]] = {}
    converted: dict[int, str] = {}
    for split in SPLITS:
        samples = getattr(splits, split)
        if not samples:
            raise ConfigError(
                f"{datamodule.dataset_name} in {datamodule.root}: the {split} split is empty; check the dataset"
            )
        if id(samples) not in converted:
            convert_split(samples, folder, join(out, split), cfg.num_workers, cfg.chunk_bytes, cfg.write_seed)
            converted[id(samples)] = split
        counts = Counter(label for _, label in samples)
        entries[split] = {
            "dir": converted[id(samples)],
            "size": len(samples),
            "class_counts": [counts[label] for label in range(len(splits.class_names))],
        }
    metadata = {
        "version": METADATA_VERSION,
        "dataset": datamodule.dataset_name,
        "source": layout,
        "class_names": splits.class_names,
        "expected_sizes": splits.expected_sizes,
        "splits": entries,
    }
    _write_text(join(out, METADATA_FILE), json.dumps(metadata, indent=1))
    sizes = ", ".join(f"{split} {entries[split]['size']}" for split in SPLITS)
    print(f"data convert: {datamodule.dataset_name} ({len(splits.class_names)} classes; {sizes} images) -> {out}")
    return Outcome(final={f"{split}_images": float(entries[split]["size"]) for split in SPLITS})


def main(args: Sequence[str]) -> int:
    """``das-lab data convert data=NAME data.root=DIR out=DIR_OR_URL [num_workers=N]``."""
    return run_command(convert, "convert", "data convert", list(args))
