"""Under DDP every epoch draws a new order: Lightning's sampler wrapper must forward set_epoch."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from das_lab.callbacks.checkpoint_state import RngStateInCheckpoint
from das_lab.data.datamodule import DataModuleBase


class _Indices(Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index)])


class _IndexData(DataModuleBase):
    def setup(self, stage: str | None = None) -> None:
        self.train_set = _Indices()


class _RecordOrder(L.LightningModule):
    """Writes, per rank and epoch, the sample indices it trained on and the epoch its sampler was given."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.extend(int(v) for v in batch.flatten())
        return (self.weight * batch).sum()

    def on_train_epoch_start(self) -> None:
        # the das-lab sampler inside Lightning's distributed wrapper: its epoch fixes the order
        self.sampler_epoch = self.trainer.train_dataloader.sampler.dataset._sampler.epoch

    def on_train_epoch_end(self) -> None:
        path = Path(self.out_dir) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps({"seen": self.seen, "sampler_epoch": self.sampler_epoch}))
        self.seen = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_ddp_epochs_draw_new_orders_and_split_the_data(tmp_path):
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_RecordOrder(str(tmp_path)), datamodule=_IndexData(batch_size=4, num_workers=0))
    records = {
        (rank, epoch): json.loads((tmp_path / f"rank{rank}_epoch{epoch}.json").read_text())
        for rank in (0, 1)
        for epoch in (0, 1)
    }
    for epoch in (0, 1):
        # the two ranks split the data: together they see every sample once
        assert sorted(records[0, epoch]["seen"] + records[1, epoch]["seen"]) == list(range(32))
        # the wrapper forwards set_epoch (lightning < 2.6.1 did not: the das-lab order stayed epoch 0's)
        assert [records[rank, epoch]["sampler_epoch"] for rank in (0, 1)] == [epoch, epoch]
    for rank in (0, 1):
        assert records[rank, 0]["seen"] != records[rank, 1]["seen"], f"rank {rank} repeated its epoch 0 order"


class _RecordDraws(_RecordOrder):
    """Also writes the python, numpy and torch draws each rank's training steps made."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(out_dir)
        self.draws: list[list[float]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.draws.append([random.random(), float(np.random.rand()), float(torch.rand(()))])
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        path = Path(self.out_dir) / f"draws_rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.draws))
        self.draws = []


def _fit_two_ranks(out_dir: Path, ckpt_dir: Path, max_epochs: int, ckpt_path: str | None = None) -> None:
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=max_epochs,
        logger=False,
        callbacks=[RngStateInCheckpoint(), ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, filename="{epoch}")],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_RecordDraws(str(out_dir)), datamodule=_IndexData(batch_size=4, num_workers=0), ckpt_path=ckpt_path)


def test_ddp_ranks_draw_their_own_augmentations_and_resume_them(tmp_path):
    """One seed for all ranks would give every rank the same Mixup/erasing/drop-path draws; the data
    order must still be shared (the ranks split one permutation) and a resumed rank draw what it drew uninterrupted."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir(), resumed.mkdir()
    _fit_two_ranks(full, tmp_path / "ckpt", max_epochs=2)

    def read(folder: Path, name: str, rank: int, epoch: int):
        return json.loads((folder / f"{name}rank{rank}_epoch{epoch}.json").read_text())

    for epoch in (0, 1):
        seen = read(full, "", 0, epoch)["seen"] + read(full, "", 1, epoch)["seen"]
        assert sorted(seen) == list(range(32))
        for source in range(3):  # python, numpy, torch
            assert [d[source] for d in read(full, "draws_", 0, epoch)] != [
                d[source] for d in read(full, "draws_", 1, epoch)
            ]
    _fit_two_ranks(resumed, tmp_path / "ckpt_resumed", max_epochs=2, ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    for rank in (0, 1):
        assert read(resumed, "draws_", rank, 1) == read(full, "draws_", rank, 1)
        assert read(resumed, "", rank, 1)["seen"] == read(full, "", rank, 1)["seen"]
