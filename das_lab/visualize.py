"""``das-lab visualize``: attention figures (DAS gates, DAT++ sampling) of a checkpoint on any images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from das_lab.command import Outcome, Run, run_command
from das_lab.data.decode import read_rgb
from das_lab.errors import ConfigError
from das_lab.pipeline import restore_checkpoint
from das_lab.plots import attention_figures, can_draw, save_figures
from das_lab.tasks.base import ImageInputs, require_data
from das_lab.tasks.segmentation import SegmentationModule
from das_lab.tasks.segmentation_overlays import write_overlays

log = logging.getLogger(__name__)


def eval_transform(datamodule: Any) -> Callable[[Tensor], Tensor]:
    """The checkpoint's evaluation preprocessing for a uint8 (3, H, W) image."""
    return require_data(datamodule, ImageInputs, "das-lab visualize").eval_transform


def visualize(cfg: DictConfig, run: Run) -> Outcome:
    """Write the attention figures of ``cfg.ckpt_path`` for ``cfg.images``."""
    images = [cfg.images] if isinstance(cfg.images, str) else list(cfg.images)
    if not images:
        raise ConfigError("images=[]: give at least one image, e.g. images=[a.jpg,b.png]")
    missing = [path for path in images if not Path(path).expanduser().is_file()]
    if missing:
        raise ConfigError(f"images not found: {', '.join(map(str, missing))}")
    restored = restore_checkpoint(cfg.ckpt_path)
    run.start()
    out_dir = Path(cfg.out_dir or run.dir / "visualizations").expanduser().absolute()
    if isinstance(
        restored.module, SegmentationModule
    ):  # segmentation checkpoints: colour overlays of the predicted classes
        paths = write_overlays(restored.module, [Path(path).expanduser() for path in images], out_dir)
        print(*paths, sep="\n")
        return Outcome()
    if not can_draw(restored.net):
        raise ConfigError(
            f"{type(restored.net).__name__} has no DAS gates or deformable sampling: there is nothing to draw"
        )
    transform = eval_transform(instantiate(restored.data))
    inputs = [transform(read_rgb(Path(path).expanduser())) for path in images]
    figures = attention_figures(restored.net, inputs, [Path(path).name for path in images])
    paths = save_figures(figures, out_dir)
    log.info("%d figures in %s", len(paths), out_dir)
    print(*paths, sep="\n")
    return Outcome()


def main(args: Sequence[str]) -> int:
    """``das-lab visualize ckpt_path=PATH images=[a.jpg,...] [out_dir=DIR]``."""
    return run_command(visualize, "visualize", "visualize", list(args))
