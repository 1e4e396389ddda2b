"""``data.format=litdata``: an image-classification dataset read from LitData shards instead of its folders.

``das-lab data convert`` (das_lab/data/convert.py) writes, in its ``out`` location (a folder or an
object-store URL such as ``s3://bucket/imagenet``)::

    train/  val/  [test/]        one LitData dataset per split (index.json + chunk-*.bin); each record
                                 holds an image's original encoded bytes, its label and its file name
    das_lab_shards.json          class names, split sizes and per-class counts; written last, so its
                                 presence means the conversion completed

With ``data.format=litdata`` a datamodule's ``data.root`` is that location. The records carry the
labels the folder form assigns (same class order and subset), and are decoded and transformed by the
same code as the folder form. ``StreamingDataset`` splits every split across ranks, nodes and
loader workers itself (no DistributedSampler; Lightning adds none to an iterable dataset), shuffles
the training split by (seed, epoch), and ``StreamingDataLoader.state_dict`` is saved in every
checkpoint by Lightning's fit loop, so a run resumed from a mid-epoch checkpoint continues with the
very next batch. Under DDP each rank gets the same number of whole training batches: up to
``world_size * batch_size - 1`` images (others each epoch) are left out of an epoch, as with
DistributedSampler's ``drop_last``. Every epoch permutes the chunks over all ranks of all nodes
(``ImageShardDataset`` says why LitData's per-node and local-folder modes are not used).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.utilities.env import _DistributedEnv

from das_lab.data.decode import CorruptImageError, decode_rgb
from das_lab.errors import ConfigError, UserError
from das_lab.utils.seeding import run_seed

log = logging.getLogger(__name__)

FORMATS = ("folder", "litdata")
METADATA_FILE = "das_lab_shards.json"
INDEX_FILE = "index.json"
METADATA_VERSION = 1
SPLITS = ("train", "val", "test")


class ShardsError(UserError, FileNotFoundError):
    """Converted shards that cannot be used: missing, unreachable, interrupted or made for other classes."""


def is_url(location: str) -> bool:
    """True for object-store locations (s3://, gs://, ...), False for local folders."""
    return "://" in location


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a folder or a URL alike."""
    return "/".join([location.rstrip("/"), *parts])


def check_format(data_format: str, skip_corrupt: bool) -> str:
    """Validate ``data.format``; shards have no replacement policy for corrupt records (verify finds them)."""
    if data_format not in FORMATS:
        raise ConfigError(f"data.format={data_format}: expected one of {', '.join(FORMATS)}")
    if data_format == "litdata" and skip_corrupt:
        raise ConfigError(
            "data.skip_corrupt=true is not available with data.format=litdata: find unreadable records with "
            "`das-lab data verify data.format=litdata data.root=...` and convert again without them"
        )
    return data_format


def convert_command(dataset: str, location: str) -> str:
    """The command that (re)creates or finishes a conversion at ``location``."""
    return f"das-lab data convert data={dataset} data.root=<dataset folder> out={location}"


def object_store(url: str) -> Any:
    """LitData's client for ``url``'s object store; S3 gives up after 3 tries (LitData's own default is 1000)."""
    from litdata.streaming.fs_provider import _get_fs_provider

    if url.startswith("s3://"):
        from botocore.config import Config

        return _get_fs_provider(
            url, {"config": Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10)}
        )
    return _get_fs_provider(url)


def _read_remote(url: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        local = str(Path(folder) / METADATA_FILE)
        object_store(url).download_file(url, local)
        return Path(local).read_text()


def read_metadata(location: str, dataset: str) -> dict[str, Any]:
    """The conversion's metadata at ``location``; one clear error when it is missing, unreachable or interrupted."""
    path = join(location, METADATA_FILE)
    how = convert_command(dataset, location)
    if is_url(location):
        try:
            text = _read_remote(path)
        except Exception as error:  # every provider raises its own kinds (botocore, google, network)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ShardsError(
                f"data.root={location}: cannot read {path} ({reason}); check the URL and your credentials, "
                f"or convert the dataset there first: {how}"
            ) from error
    else:
        folder = Path(location).expanduser()
        if not (folder / METADATA_FILE).is_file():
            if folder.is_dir() and any((folder / split).is_dir() for split in SPLITS):
                raise ShardsError(
                    f"data.root={location}: the conversion there was interrupted ({METADATA_FILE} is written last "
                    f"and is missing); finish it by running the same command again: {how}"
                )
            raise ShardsError(
                f"data.root={location}: no converted dataset there (no {METADATA_FILE}); create it with: {how}"
            )
        text = (folder / METADATA_FILE).read_text()
    metadata = json.loads(text)
    if metadata.get("version") != METADATA_VERSION:
        raise ShardsError(
            f"{path}: written by another das-lab version (format {metadata.get('version')}, expected "
            f"{METADATA_VERSION}); convert the dataset again: {how}"
        )
    return metadata


def check_classes(metadata: dict[str, Any], num_classes: int, location: str) -> None:
    """Refuse shards converted for another class subset than ``data.num_classes``."""
    found = len(metadata["class_names"])
    if found != num_classes:
        raise ShardsError(
            f"data.root={location} was converted with {found} classes but data.num_classes={num_classes}; "
            f"set data.num_classes={found}, or convert again with data.num_classes={num_classes} into another out"
        )


def shard_cache_dir(cache_dir: str, location: str, split: str) -> Optional[str]:
    """Where LitData keeps downloaded chunks of a remote split (``None``: a local split is read in place)."""
    if not is_url(location):
        return None
    key = hashlib.sha1(location.encode()).hexdigest()[:16]
    return str(Path(cache_dir).expanduser() / "litdata" / key / split)


def check_records(dataset: "ImageShardDataset", size: int, name: str) -> None:
    """Refuse a split whose shards hold another number of records than the conversion wrote."""
    found = sum(end - start for start, end in dataset.region_of_interest)
    if found != size:
        raise ShardsError(
            f"{dataset.location}: {found} records but the conversion wrote {size}; the shards were changed or "
            f"damaged: convert again into a new out: {convert_command(name, '<new location>')}"
        )


class ImageShardDataset(StreamingDataset):
    """One converted split: records decoded to uint8 RGB and passed through the split's transform."""

    def __init__(
        self,
        location: str,
        cache_dir: Optional[str],
        image_transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
        shuffle: bool,
        seed: int,
        class_counts: list[int],
    ) -> None:
        super().__init__(
            location if is_url(location) else str(Path(location).expanduser()),
            cache_dir=cache_dir,
            shuffle=shuffle,
            seed=seed,
        )
        # LitData (0.2.76) reassigns chunks within each node from the second epoch on, and a chunk that
        # straddled two nodes in the first epoch is then read by both: images repeat. As one node, every
        # epoch's chunks are permuted by (seed, epoch) and split across all ranks: each image once.
        self.distributed_env = _DistributedEnv(self.distributed_env.world_size, self.distributed_env.global_rank, 1)
        # On local folders LitData would hand each loader worker the same fixed stripe of chunks every
        # epoch (its POSIX mode), trimming every worker to the shortest; the object-store mode used
        # everywhere instead permutes chunks by (seed, epoch) and splits them item by item.
        self.posix_fast = None
        self.location = location
        self.image_transform = image_transform
        self.class_counts = class_counts

    @property
    def targets(self) -> list[int]:
        """Every record's label, in class order (the stream's order depends on the epoch and the rank)."""
        return [label for label, count in enumerate(self.class_counts) for _ in range(count)]

    def record(self, index: Any) -> dict[str, Any]:
        """The stored record: ``image`` (encoded bytes), ``label`` and ``path`` (relative to data.root)."""
        return super().__getitem__(index)

    def decode(self, record: dict[str, Any], index: Any) -> torch.Tensor:
        """A record's image as uint8 RGB; a corrupt one names the record and its source file."""
        where = f"{self.location} record {getattr(index, 'index', index)} ({record['path']})"
        try:
            return decode_rgb(record["image"], where)
        except CorruptImageError as error:
            reason = str(error).rsplit("; ", 1)[0]
            raise CorruptImageError(f"{reason}; replace that file in the dataset folder and convert again") from error

    def load_image(self, index: int) -> torch.Tensor:
        """The decoded uint8 RGB image of record ``index``, before any transform (data verify)."""
        return self.decode(self.record(index), index)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, int]:
        record = self.record(index)
        image = self.decode(record, index)
        if self.image_transform is not None:
            image = self.image_transform(image)
        return image, int(record["label"])


class ShardsFormat:
    """Mixin for image datamodules: ``data.format=litdata`` reads the splits from converted shards.

    Placed before ``ImageClassificationDataModule`` in the bases; the datamodule's constructor calls
    :meth:`init_format`. With ``data.format=folder`` every method defers to the folder form.
    """

    dataset_name: str
    data_format = "folder"

    def init_format(self, data_format: str, root: str, cache_dir: str) -> None:
        """Remember the format and the location as given (a URL must not go through ``Path``)."""
        self.data_format = check_format(data_format, self.skip_corrupt)
        self.location = root
        self.shards_cache_dir = cache_dir

    def prepare_data(self) -> None:
        if self.data_format == "folder":
            super().prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data_format == "folder":
            super().setup(stage)
            return
        if self.train_set is not None:
            return
        metadata = read_metadata(self.location, self.dataset_name)
        check_classes(metadata, self.num_classes, self.location)
        self.class_names = list(metadata["class_names"])
        self.expected_sizes = dict(metadata["expected_sizes"])
        self.layout = f"LitData shards in {self.location} (converted from {metadata['source']})"
        seed = run_seed() % 2**32  # numpy's RNG takes 32 bits
        train_transform, eval_transform = self.dataset_transforms()
        made: dict[str, ImageShardDataset] = {}
        for split in SPLITS:
            entry = metadata["splits"][split]
            if entry["dir"] not in made:
                made[entry["dir"]] = ImageShardDataset(
                    join(self.location, entry["dir"]),
                    shard_cache_dir(self.shards_cache_dir, self.location, entry["dir"]),
                    train_transform if split == "train" else eval_transform,
                    shuffle=split == "train",
                    seed=seed,
                    class_counts=entry["class_counts"],
                )
            check_records(made[entry["dir"]], entry["size"], self.dataset_name)
            setattr(self, f"{split}_set", made[entry["dir"]])
        sizes = {split: metadata["splits"][split]["size"] for split in SPLITS}
        log.info(
            "%s: %s; %d classes; train %d, val %d, test %d images",
            self.dataset_name,
            self.layout,
            self.num_classes,
            sizes["train"],
            sizes["val"],
            sizes["test"],
        )

    def _loader(self, dataset: Any, shuffle: bool) -> Any:
        if self.data_format == "folder":
            return super()._loader(dataset, shuffle)
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader")
        return StreamingDataLoader(
            dataset,
            batch_size=self.batch_size,
            drop_last=shuffle and sum(dataset.class_counts) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
        )
