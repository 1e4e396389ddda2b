"""Colour overlays of a segmentation model's predictions on any images (``das-lab visualize``)."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import torch
from torchvision.io import write_png
from torchvision.utils import draw_segmentation_masks

from das_lab.data.ade20k import normalize
from das_lab.data.decode import read_rgb
from das_lab.tasks.segmentation import SegmentationModule


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct, fixed colours: hues spaced by the golden ratio, alternating lightness."""
    colours = []
    for k in range(num_classes):
        red, green, blue = colorsys.hls_to_rgb((k * 0.618033988749895) % 1.0, 0.45 + 0.2 * (k % 2), 0.85)
        colours.append((round(255 * red), round(255 * green), round(255 * blue)))
    return colours


def overlay(image: torch.Tensor, prediction: torch.Tensor, num_classes: int, alpha: float = 0.5) -> torch.Tensor:
    """A uint8 (3, H, W) image with each predicted class painted in its palette colour."""
    masks = prediction[None] == torch.arange(num_classes, device=prediction.device)[:, None, None]
    return draw_segmentation_masks(image, masks.cpu(), alpha=alpha, colors=palette(num_classes))


@torch.no_grad()
def write_overlays(module: SegmentationModule, images: Sequence[Path], out_dir: Path) -> list[Path]:
    """Predict every image at its own size (the module's test scale and TTA) and save ``<name>_overlay.png``."""
    module.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in images:
        rgb = read_rgb(path)
        prediction = module.predict_probabilities(normalize(rgb)).argmax(dim=0)
        target = out_dir / f"{path.stem}_overlay.png"
        write_png(overlay(rgb, prediction, module.num_classes), str(target))
        paths.append(target)
    return paths
