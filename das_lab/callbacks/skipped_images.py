"""Report the corrupt images that ``data.skip_corrupt=true`` replaced, once per epoch and split."""

from __future__ import annotations

import logging

import lightning as L

from das_lab.data.datasets import ImageSampleDataset

log = logging.getLogger(__name__)


class SkippedImagesReport(L.Callback):
    """Logs, at the end of each epoch, which corrupt images ``skip_corrupt=true`` replaced."""

    def __init__(self) -> None:
        self.last_counts: dict[str, int] = {}

    def _report(self, trainer: L.Trainer, split: str) -> None:
        dataset = getattr(trainer.datamodule, f"{split}_set", None)
        if not isinstance(dataset, ImageSampleDataset):
            return
        paths = dataset.take_skipped()
        if paths:
            shown = ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")
            log.warning(
                "%s epoch %d: %d corrupt image(s) skipped and replaced (data.skip_corrupt=true): %s",
                split,
                trainer.current_epoch,
                len(paths),
                shown,
            )
        self.last_counts[split] = len(paths)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "test")
