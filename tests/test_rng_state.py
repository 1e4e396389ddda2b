"""RNG states in checkpoints: each rank restores its own; checkpoints from before per-rank states still load."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch

from das_lab.callbacks.checkpoint_state import RNG_KEY, RngStateInCheckpoint, collect_rng_states
from das_lab.utils.seeding import run_seed, seed_rank_streams


def draws() -> list[float]:
    return [random.random(), float(np.random.rand()), float(torch.rand(()))]


def states_after_seed(seed: int) -> dict:
    seed_rank_streams(seed, 0)
    return collect_rng_states()


def draws_after_seed(seed: int) -> list[float]:
    seed_rank_streams(seed, 0)
    return draws()


def test_each_rank_restores_its_own_saved_states():
    per_rank = [states_after_seed(10), states_after_seed(20)]
    expected = {0: draws_after_seed(10), 1: draws_after_seed(20)}
    for rank in (0, 1, 3):  # rank 3 of a larger world takes saved rank 3 % 2 = 1
        callback = RngStateInCheckpoint()
        callback.on_load_checkpoint(SimpleNamespace(global_rank=rank), None, {RNG_KEY: {"per_rank": per_rank}})
        assert callback.restored
        assert draws() == expected[rank % 2]


def test_a_checkpoint_with_one_set_of_states_still_restores_it():
    legacy = states_after_seed(7)
    expected = draws()
    callback = RngStateInCheckpoint()
    callback.on_load_checkpoint(SimpleNamespace(global_rank=1), None, {RNG_KEY: legacy})
    assert draws() == expected


def test_fresh_ranks_get_different_streams_and_one_rank_keeps_its_run_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # what seed_everything(5) leaves for every rank
    trainer = SimpleNamespace(world_size=2, global_rank=1)
    RngStateInCheckpoint().on_train_start(trainer, None)
    rank_one = draws()
    seed_rank_streams(5, 0)
    assert draws() != rank_one
    seed_rank_streams(5, 1)
    assert draws() == rank_one
    torch.manual_seed(5)
    single = SimpleNamespace(world_size=1, global_rank=0)
    before = torch.get_rng_state()
    RngStateInCheckpoint().on_train_start(single, None)  # one process: the run's streams are left alone
    assert torch.equal(torch.get_rng_state(), before)


def test_the_run_seed_survives_restored_and_reseeded_streams(monkeypatch):
    """The data order's seed: the same on every rank whatever their streams do (a resumed rank restores
    its own reseeded state, whose initial seed is no longer the run's)."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    seed_rank_streams(11, 3)
    assert torch.initial_seed() == 14 and run_seed() == 11
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert run_seed() == torch.initial_seed()
