"""Draw attention (DAS gate maps, DAT++ sampling points) on fixed validation images during training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning as L
import matplotlib.pyplot as plt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from das_lab.plots import attention_figures, can_draw, save_figures

log = logging.getLogger(__name__)


class AttentionVisualizer(Callback):
    """Every ``every_n_epochs`` validation epochs, save and log attention figures of the first ``num_images``.

    PNGs go to ``<dirpath>/epoch_XXX/`` (default ``<trainer.default_root_dir>/visualizations``) and to
    the active W&B or TensorBoard loggers. A network without DAS gates or deformable sampling is
    reported once and left alone.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 4, dirpath: Optional[str] = None) -> None:
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(
                f"callbacks.visualize: every_n_epochs={every_n_epochs} and num_images={num_images} must be >= 1"
            )
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.dirpath = dirpath
        self._images: Optional[list[Tensor]] = None
        self._titles: list[str] = []
        self._nothing_to_draw = False

    def _fixed_images(self, trainer: L.Trainer) -> tuple[list[Tensor], list[str]]:
        """The first ``num_images`` validation samples (same every epoch) and their titles."""
        if self._images is None:
            loaders = trainer.val_dataloaders
            dataset = (loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset
            names = getattr(trainer.datamodule, "class_names", None) or []
            self._images, self._titles = [], []
            for index in range(min(self.num_images, len(dataset))):
                image, label = dataset[index][:2]
                self._images.append(image)
                label = int(label) if not isinstance(label, dict) else None
                name = names[label] if label is not None and label < len(names) else label
                self._titles.append(f"val {index}" + (f": {name}" if name is not None else ""))
        return self._images, self._titles

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._nothing_to_draw:
            return
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs:
            return
        net = getattr(pl_module, "net", pl_module)
        if not can_draw(net):
            log.info(
                "callbacks.visualize: %s has no DAS gates or deformable sampling; nothing to draw", type(net).__name__
            )
            self._nothing_to_draw = True
            return
        images, titles = self._fixed_images(trainer)
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "visualizations") / f"epoch_{epoch:03d}"
        paths = save_figures(attention_figures(net, images, titles), folder)
        log.info("attention figures of epoch %d in %s", epoch, folder)
        self._log_images(trainer, paths)

    def _log_images(self, trainer: L.Trainer, paths: list[Path]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for path in paths:
                    logger.log_image(key=f"visualizations/{path.stem}", images=[str(path)], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                for path in paths:
                    logger.experiment.add_image(
                        f"visualizations/{path.stem}", plt.imread(path)[..., :3], trainer.global_step, dataformats="HWC"
                    )
