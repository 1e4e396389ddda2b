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


class RngStateInCheckpoint(Callback):
    """Saves and restores the RNG states, so a resumed run draws what the uninterrupted one would; under
    DDP, gives every rank its own random stream.

    ``seed_everything`` gives every rank the same seed, so each rank's training step would draw the
    same Mixup/CutMix mixes, erasing boxes and drop-path masks. Under DDP each rank therefore reseeds
    at the first batch of every epoch from (the run's seed, its rank, the epoch), after the epoch's
    loader has drawn its workers' seed (from rank 0's stream, the state a checkpoint keeps): a run
    resumed from an epoch's checkpoint then draws what the uninterrupted one did, with no per-rank
    states gathered into the checkpoint (a collective there could hold a rank that a requeue signal
    let go). Resumed mid-epoch, the ranks share rank 0's stream until the next epoch. The loaders'
    shuffling seed is the run's seed on every rank (``das_lab.utils.seeding.run_seed``).
    """

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size > 1 and batch_idx == 0:
            seed_rank_streams(run_seed(), trainer.global_rank, trainer.current_epoch)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = collect_rng_states()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if RNG_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_KEY])
