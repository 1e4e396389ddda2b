"""Per-rank random streams under DDP: each (rank, epoch) its own draws, the data order's seed shared."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch

from das_lab.callbacks.checkpoint_state import RngStateInCheckpoint
from das_lab.utils.seeding import run_seed, seed_rank_streams


def draws() -> list[float]:
    return [random.random(), float(np.random.rand()), float(torch.rand(()))]


def draws_after(base_seed: int, rank: int, epoch: int) -> list[float]:
    seed_rank_streams(base_seed, rank, epoch)
    return draws()


def test_each_rank_and_epoch_draws_its_own_stream_and_only_from_its_numbers():
    streams = {(rank, epoch): draws_after(7, rank, epoch) for rank in range(3) for epoch in range(3)}
    for source in range(3):  # python, numpy, torch
        assert len({values[source] for values in streams.values()}) == 9
    random.random(), np.random.rand(), torch.rand(())  # whatever ran before does not matter
    assert draws_after(7, 1, 2) == streams[1, 2]


def test_ranks_reseed_at_every_epochs_first_batch_and_a_single_process_keeps_its_streams(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # what seed_everything(5) leaves for every rank
    callback = RngStateInCheckpoint()
    rank_one = SimpleNamespace(world_size=2, global_rank=1, current_epoch=3)
    callback.on_train_batch_start(rank_one, None, None, 0)
    assert draws() == draws_after(5, 1, 3)
    for trainer, batch_idx in ((rank_one, 1), (SimpleNamespace(world_size=1, global_rank=0, current_epoch=3), 0)):
        torch.manual_seed(5)
        before = torch.get_rng_state()
        callback.on_train_batch_start(trainer, None, None, batch_idx)
        assert torch.equal(torch.get_rng_state(), before)  # later batches; one process (restored states suffice)


def test_the_run_seed_survives_reseeded_streams(monkeypatch):
    """The data order's seed must be the same on every rank whatever their streams do."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    seed_rank_streams(11, 3, 0)
    assert torch.initial_seed() != 11 and run_seed() == 11
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert run_seed() == torch.initial_seed()
