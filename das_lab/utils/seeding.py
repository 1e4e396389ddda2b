"""The run's seed and per-rank random streams: one data order for every DDP rank, its own draws for each."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def run_seed() -> int:
    """The seed the run gave ``lightning.seed_everything`` (``PL_GLOBAL_SEED``, the same on every rank and
    after a resume restored RNG states); without one, torch's initial seed."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else torch.initial_seed()


def seed_rank_streams(base_seed: int, rank: int, epoch: int) -> None:
    """Reseed torch (CPU and CUDA), numpy and python from (``base_seed``, ``rank``, ``epoch``): ranks then
    draw their own Mixup, erasing, dropout and drop-path randomness, as timm's training script seeds
    ``seed + rank``, and every epoch's draws follow from its number alone (resumes need no saved state)."""
    seed = int(np.random.SeedSequence([base_seed, rank, epoch]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


__all__ = ["run_seed", "seed_rank_streams"]
