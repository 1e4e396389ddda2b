"""Training on LitData shards with a model that records which images it was given, for test_litdata.py.

Every generated image has its own width (``unique_imagenet``), so the train transform ``width_id``
turns an image into its id; ``Recorder`` trains one weight on those ids and keeps them per epoch.
``node`` is one "node" of a two-node DDP run on loopback (Lightning's environment variables:
NODE_RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and writes what its rank saw as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn

from fake_datasets import IMAGENET_WNIDS, write_image

FIRST_WIDTH = 16


def unique_imagenet(root: Path, train_per_class: int, val_per_class: int) -> Path:
    """ImageNet folder layout whose images all differ in width (the id); one PNG named .JPEG."""
    width = FIRST_WIDTH
    for label, wnid in enumerate(IMAGENET_WNIDS):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for n in range(count):
                kind = "png" if (label, n, split) == (0, 0, "train") else "rgb"
                write_image(root / split / wnid / f"{wnid}_{width}.JPEG", label, kind, size=(width, 16))
                width += 1
    return root


def width_id(image: torch.Tensor) -> torch.Tensor:
    """An image's id: its width."""
    return torch.tensor([float(image.shape[-1])])


def shards_datamodule(root: Path, batch_size: int, workers: int = 0) -> Any:
    """The imagenet datamodule on converted shards, with ``width_id`` as its transforms."""
    from das_lab.data.verify import compose_config

    cfg = compose_config(
        [
            "data=imagenet",
            "data.format=litdata",
            f"data.root={root}",
            f"data.num_classes={len(IMAGENET_WNIDS)}",
            "data.image_size=16",
            f"data.batch_size={batch_size}",
            f"data.num_workers={workers}",
            "data.pin_memory=false",
            "data.persistent_workers=false",
            "data.prefetch_factor=null",
        ]
    )
    datamodule = instantiate(cfg.data)
    datamodule.train_transform = datamodule.eval_transform = width_id
    return datamodule


class Recorder(L.LightningModule):
    """One weight fitted to the labels from the ids; ``seen[epoch]`` lists the ids of that epoch, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        self.seen.setdefault(self.current_epoch, []).extend(int(i) for i in ids.flatten())
        return (self.weight * ids.flatten() / 100 - labels).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer without logger or checkpoints (the test adds what it needs)."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def node(shards: Path, out: Path, epochs: int, env: dict[str, str]) -> None:
    """One node of a two-node run (a forked process; ``env``: Lightning's cluster variables): train
    ``epochs`` epochs, write this rank's ids per epoch to ``out``."""
    os.environ.update(env)
    L.seed_everything(0)
    module = Recorder()
    fit = trainer(num_nodes=2, strategy="ddp", max_epochs=epochs)
    fit.fit(module, datamodule=shards_datamodule(shards, 4))
    out.write_text(json.dumps({"rank": fit.global_rank, "seen": module.seen}))
