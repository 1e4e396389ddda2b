"""Extra state in das-lab checkpoints: the run's config, its class names, and RNG states for exact resumes."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from das_lab.utils.seeding import run_seed, seed_rank_streams

CONFIG_KEY = "das_lab_config"
CLASSES_KEY = "das_lab_classes"
RNG_KEY = "das_lab_rng_states"


class ConfigInCheckpoint(Callback):
    """Stores the resolved data/model/task config in every checkpoint, so it rebuilds on its own."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


class ClassesInCheckpoint(Callback):
    """Stores the data's class names (and COCO category ids), so exports and predictions name their classes
    without the dataset at hand."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        datamodule = trainer.datamodule
        names = list(getattr(datamodule, "class_names", None) or [])
        if not names:
            return
        checkpoint[CLASSES_KEY] = {"names": names}
        category_ids = getattr(datamodule, "category_ids", None)
        if category_ids:
            checkpoint[CLASSES_KEY]["category_ids"] = [int(i) for i in category_ids]


def collect_rng_states() -> dict[str, Any]:
    """torch, numpy and python RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_per_rank(states: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``states`` in rank order (a list of one without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [states]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, states)
    return gathered


class RngStateInCheckpoint(Callback):
    """Per-rank random streams under DDP, saved and restored per rank, so a resumed run draws what the
    uninterrupted one would.

    ``seed_everything`` gives every rank the same seed, so without this each rank's training step
    would draw the same Mixup/CutMix mixes, erasing boxes and drop-path masks. A fresh run reseeds
    each rank from the run's seed and its rank when training starts (after the loaders took their
    shuffling seed, which must stay the same on every rank); checkpoints keep every rank's states and
    a resumed rank takes its own (with another world size, rank ``r`` takes saved rank ``r % n``).
    """

    def __init__(self) -> None:
        self.restored = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1 and not self.restored:
            seed_rank_streams(run_seed(), trainer.global_rank)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = {"per_rank": gather_per_rank(collect_rng_states())}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get(RNG_KEY)
        if saved is None:
            return
        per_rank = saved.get("per_rank", [saved])  # checkpoints before per-rank states held one rank's
        restore_rng_states(per_rank[trainer.global_rank % len(per_rank)])
        self.restored = True
