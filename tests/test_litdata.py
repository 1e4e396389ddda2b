"""ImageNet-format folders as LitData shards: conversion, training, resuming mid-epoch, two nodes, verify, bad input."""

from __future__ import annotations

import json
import multiprocessing
import re
import shutil
import socket
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from litdata import StreamingDataset

from cli_helpers import error_line
from das_lab.cli import data_main
from das_lab.data.convert import main as convert_main
from das_lab.data.litdata_shards import METADATA_FILE, ShardsError, read_metadata
from das_lab.data.verify import compose_config
from das_lab.data.verify import main as verify_main
from fake_datasets import IMAGENET_WNIDS, make_stanford_dogs, snapshot, truncate
from litdata_node import FIRST_WIDTH, Recorder, node, shards_datamodule, trainer, unique_imagenet

TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 1
TRAIN_IMAGES = TRAIN_PER_CLASS * len(IMAGENET_WNIDS)
# unique_imagenet gives each class TRAIN_PER_CLASS training widths, then VAL_PER_CLASS validation widths
TRAIN_IDS = [
    FIRST_WIDTH + (TRAIN_PER_CLASS + VAL_PER_CLASS) * label + n
    for label in range(len(IMAGENET_WNIDS))
    for n in range(TRAIN_PER_CLASS)
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset folder, its shards) converted once through `das-lab data convert` for the whole module."""
    base = tmp_path_factory.mktemp("litdata")
    root = unique_imagenet(base / "imagenet", TRAIN_PER_CLASS, VAL_PER_CLASS)
    truncate(next((root / "val" / IMAGENET_WNIDS[2]).iterdir()))  # stored as is; data verify must find it
    before = snapshot(root)
    out = base / "shards"
    args = [
        "data=imagenet",
        f"data.root={root}",
        "data.num_classes=4",
        f"out={out}",
        "num_workers=1",
        "chunk_bytes=2kb",
        f"hydra.run.dir={base / 'run'}",
    ]
    assert data_main(["convert", *args]) == 0
    assert snapshot(root) == before  # nothing written into data.root
    return root, out


def datamodule(root: Path, *overrides: str):
    """The imagenet datamodule (4 classes, 16 px) on ``root``, set up, its training images transformed for eval."""
    cfg = compose_config(["data=imagenet", f"data.root={root}", "data.num_classes=4", "data.image_size=16", *overrides])
    module = instantiate(cfg.data)
    module.train_transform = module.eval_transform  # deterministic, so both forms must give equal tensors
    module.setup()
    return module


def test_conversion_keeps_every_image_and_label(converted):
    root, out = converted
    folder = datamodule(root)
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["class_names"] == folder.class_names == ["tench", "goldfish", "great white shark", "tiger shark"]
    assert {split: entry["dir"] for split, entry in metadata["splits"].items()} == {
        "train": "train",
        "val": "val",
        "test": "val",
    }
    for split in ("train", "val"):
        records = StreamingDataset(str(out / split))
        assert len(records.subsampled_files) > 1  # several chunks
        assert Counter((r["image"], r["label"]) for r in records) == Counter(
            (Path(path).read_bytes(), label) for path, label in getattr(folder, f"{split}_set").samples
        )
    stored = [r["label"] for r in StreamingDataset(str(out / "train"))]
    assert stored != sorted(stored)  # written in shuffled order: chunks mix the classes
    shards = datamodule(out, "data.format=litdata")
    assert shards.class_names == folder.class_names
    from_folder = sorted(
        (label, image.flatten().tolist())
        for image, label in map(folder.train_set.__getitem__, range(len(folder.train_set)))
    )
    assert sorted((label, image.flatten().tolist()) for image, label in shards.train_set) == from_folder


def test_stanford_dogs_convert_with_their_breeds(tmp_path):
    dogs = make_stanford_dogs(tmp_path / "dogs", train_per_class=2, test_per_class=1)
    out = tmp_path / "shards"
    assert (
        convert_main(
            [
                "data=stanford_dogs",
                f"data.root={dogs.root}",
                "data.num_classes=3",
                f"out={out}",
                "num_workers=1",
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )
        == 0
    )
    shards = instantiate(
        compose_config(["data=stanford_dogs", "data.format=litdata", f"data.root={out}", "data.num_classes=3"]).data
    )
    shards.setup()
    assert shards.class_names == ["Chihuahua", "Japanese spaniel", "Maltese dog"]
    assert sorted(r["path"] for r in StreamingDataset(str(out / "val"))) == sorted(f"Images/{f}" for f in dogs.test)
    assert sorted(label for _, label in shards.test_set) == [0, 1, 2]
    with pytest.raises(InstantiationException, match="data.crop_to_bbox=true needs the annotations"):
        instantiate(compose_config(["data=stanford_dogs", "data.format=litdata", "data.crop_to_bbox=true"]).data)


def test_rerun_finishes_an_interrupted_conversion(converted, tmp_path, capsys):
    root, out = converted
    partial = tmp_path / "shards"
    shutil.copytree(out, partial)
    (partial / METADATA_FILE).unlink()
    shutil.rmtree(partial / "val")
    with pytest.raises(ShardsError, match="interrupted .* finish it by running the same command again"):
        read_metadata(str(partial), "imagenet")
    args = [
        "data=imagenet",
        f"data.root={root}",
        "data.num_classes=4",
        f"out={partial}",
        "num_workers=1",
        "chunk_bytes=2kb",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    finished = snapshot(partial / "train")
    assert convert_main(args) == 0
    assert snapshot(partial / "train") == finished  # the finished split is kept, not written again
    assert (partial / METADATA_FILE).read_text() == (out / METADATA_FILE).read_text()
    capsys.readouterr()
    assert convert_main(args) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"das-lab: error: out={partial} already holds a complete conversion ({METADATA_FILE}); choose another out"
    )
    assert Counter(r["image"] for r in StreamingDataset(str(partial / "val"))) == Counter(
        r["image"] for r in StreamingDataset(str(out / "val"))
    )


class Interrupt(Exception):
    """Stands for a kill: raised right after a checkpoint was saved mid-epoch."""


class SaveAndInterrupt(L.Callback):
    """Saves ``path`` after training step ``step``, then stops the run."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise Interrupt


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_ends_like_an_uninterrupted_run(converted, tmp_path, workers):
    _, out = converted

    def run(stop_at: int | None = None, ckpt_path: str | None = None) -> Recorder:
        L.seed_everything(0)
        module = Recorder()
        if stop_at is None:
            trainer(max_epochs=2).fit(
                module, datamodule=shards_datamodule(out, 4, workers), ckpt_path=ckpt_path, weights_only=True
            )
        else:
            with pytest.raises(Interrupt):
                trainer(max_epochs=2, callbacks=[SaveAndInterrupt(stop_at, tmp_path / "mid.ckpt")]).fit(
                    module, datamodule=shards_datamodule(out, 4, workers)
                )
        return module

    whole = run()
    assert [sorted(whole.seen[epoch]) for epoch in (0, 1)] == [TRAIN_IDS] * 2
    assert whole.seen[0] != whole.seen[1]  # reshuffled every epoch
    assert run().seen == whole.seen  # the order is fixed by (seed, epoch)
    stopped = run(stop_at=6)  # epoch 1, after its second of four batches
    resumed = run(ckpt_path=str(tmp_path / "mid.ckpt"))
    assert stopped.seen[0] == whole.seen[0]
    assert stopped.seen[1][:8] + resumed.seen[1] == whole.seen[1]
    assert torch.equal(resumed.weight, whole.weight)


def test_two_nodes_see_every_training_image_once_per_epoch(converted, tmp_path):
    _, out = converted
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fork = multiprocessing.get_context("fork")  # no second start-up of torch and Lightning
    nodes = [
        fork.Process(
            target=node,
            args=(
                out,
                tmp_path / f"node{rank}.json",
                2,
                {
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "NODE_RANK": str(rank),
                    "LOCAL_RANK": "0",
                    "NNODES": "2",
                },
            ),
        )
        for rank in (0, 1)
    ]
    for process in nodes:
        process.start()
    for process in nodes:
        process.join(timeout=240)
    assert [process.exitcode for process in nodes] == [0, 0]
    seen = [json.loads((tmp_path / f"node{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(s["rank"] for s in seen) == [0, 1]
    for epoch in ("0", "1"):
        per_rank = [s["seen"][epoch] for s in seen]
        assert [len(ids) for ids in per_rank] == [TRAIN_IMAGES // 2] * 2
        assert sorted(per_rank[0] + per_rank[1]) == TRAIN_IDS, (epoch, per_rank)  # every image exactly once


def test_verify_reads_converted_data(converted, capsys):
    _, out = converted
    assert (
        verify_main(
            ["data=imagenet", "data.format=litdata", f"data.root={out}", "data.num_classes=4", "data.num_workers=0"]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert re.search(r"layout +LitData shards in .*shards \(converted from folder layout", captured.out)
    assert re.search(r"train images +16 ", captured.out)
    assert re.search(r"train unreadable +0 of 16 decoded", captured.out)
    assert re.search(r"val unreadable +1 of 4 decoded +0 +PROBLEM", captured.out)
    assert re.search(r"test unreadable +same images as val", captured.out)
    assert re.search(
        rf"{out / 'val'} record \d \(val/n01484850/n01484850_\d+.JPEG\): cannot decode image \(.*\); "
        r"replace that file in the dataset folder and convert again\n",
        captured.err,
    )


def test_bad_shards_give_one_line(converted, tmp_path, capsys, monkeypatch):
    _, out = converted
    assert verify_main(["data=imagenet", "data.format=litdata", f"data.root={out}", "data.num_classes=3"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[1] == (
        f"data.root={out} was converted with 4 classes but data.num_classes=3; set data.num_classes=4, "
        "or convert again with data.num_classes=3 into another out"
    )
    assert verify_main(["data=imagenet", "data.format=litdata", f"data.root={tmp_path}"]) == 1
    assert (
        "no converted dataset there (no das_lab_shards.json); create it with: das-lab data convert data=imagenet"
        in (capsys.readouterr().err)
    )
    assert error_line(convert_main, ["data=digits", f"out={tmp_path / 'shards'}"], tmp_path / "run", capsys) == (
        "das-lab: error: data=digits cannot be converted to shards; choose data=imagenet or data=stanford_dogs"
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "none")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "none")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(
        ShardsError,
        match=r"^data.root=s3://no-bucket/shards: cannot read s3://no-bucket/shards/"
        r"das_lab_shards.json \(.*\); check the URL and your credentials",
    ):
        read_metadata("s3://no-bucket/shards", "imagenet")
