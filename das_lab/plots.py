"""Attention figures as in the DAS and DAT++ papers, shared by the training callback and ``das-lab visualize``.

DAS: each placed gate's map A, averaged over channels, overlaid on the input image. DAT++: each
deformable block's sampling points (where its keys were sampled) next to their reference grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from das_lab.models.das import capture_gate_maps, gate_names  # noqa: E402

PANEL_INCHES = 2.6


def has_gates(net: nn.Module) -> bool:
    """The network contains DAS gates whose maps can be drawn."""
    return bool(gate_names(net))


def has_sampling(net: nn.Module) -> bool:
    """The network reports deformable sampling points (DAT++: ``forward_sampling(x)``)."""
    return callable(getattr(net, "forward_sampling", None))


def can_draw(net: nn.Module) -> bool:
    """There is something to visualise in ``net`` (DAS gates or deformable sampling)."""
    return has_gates(net) or has_sampling(net)


def display_image(image: Tensor) -> np.ndarray:
    """A normalised (C, H, W) input as an (H, W, 3) array in [0, 1] for display (per-image min-max)."""
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    low, high = image.min(), image.max()
    scaled = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    return scaled[:3].permute(1, 2, 0).numpy()


def _panels(count: int) -> tuple[Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, count, figsize=(PANEL_INCHES * count, PANEL_INCHES + 0.3), squeeze=False)
    for ax in axes[0]:
        ax.set_axis_off()
    return fig, list(axes[0])


def gate_figure(image: np.ndarray, gates: dict[str, np.ndarray], title: str) -> Figure:
    """The image, then one overlay per gate of its channel-averaged map (upsampled to the image)."""
    fig, axes = _panels(1 + len(gates))
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=8)
    for ax, (name, gate) in zip(axes[1:], gates.items()):
        ax.imshow(image)
        shown = ax.imshow(gate, cmap="jet", alpha=0.5, vmin=float(gate.min()), vmax=float(gate.max()))
        ax.set_title(f"A: {name}", fontsize=8)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def _to_pixels(points: Tensor, feature_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Normalised (y, x) in [-1, 1] (corners aligned with the feature map) -> (x, y) image pixels."""
    scale = []
    for axis in (1, 0):  # x from the second coordinate, y from the first
        cells, pixels = feature_size[axis], image_size[axis]
        index = (points[..., axis] + 1) / 2 * (cells - 1)
        scale.append((index + 0.5) * pixels / cells - 0.5)
    return torch.stack(scale, dim=-1).reshape(-1, points.shape[-3] * points.shape[-2], 2).numpy()


def sampling_figure(
    image: np.ndarray, blocks: Sequence[tuple[str, Tensor, Tensor, tuple[int, int]]], title: str
) -> Figure:
    """The image, then per deformable block its reference grid (white) and sampled points (per group colour).

    ``blocks`` holds (label, positions (G, Hk, Wk, 2), references (G, Hk, Wk, 2), feature map size).
    """
    fig, axes = _panels(1 + len(blocks))
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=8)
    height, width = image.shape[:2]
    colours = plt.get_cmap("tab10")
    for ax, (label, pos, ref, feature_size) in zip(axes[1:], blocks):
        ax.imshow(image.mean(-1), cmap="gray", alpha=0.7)
        sampled = _to_pixels(pos, feature_size, (height, width))
        grid = _to_pixels(ref, feature_size, (height, width))
        for group, (points, anchors) in enumerate(zip(sampled, grid)):
            colour = colours(group % 10)
            ax.plot([anchors[:, 0], points[:, 0]], [anchors[:, 1], points[:, 1]], color=colour, lw=0.5, alpha=0.6)
            ax.scatter(points[:, 0], points[:, 1], s=10, color=colour, zorder=3)
        ax.scatter(grid[..., 0], grid[..., 1], s=8, marker="x", color="white", linewidths=0.8, zorder=2)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_title(label, fontsize=8)
    fig.tight_layout()
    return fig


def _gate_maps(net: nn.Module, batch: Tensor) -> dict[str, np.ndarray]:
    """Each gate's map for a batch of one, averaged over channels and upsampled to the image."""
    with capture_gate_maps(net) as maps:
        net(batch)
    size = tuple(batch.shape[-2:])
    return {
        name: F.interpolate(m.gate.float().mean(1, keepdim=True), size=size, mode="bilinear", align_corners=False)[0, 0]
        .cpu()
        .numpy()
        for name, m in maps.items()
    }


def _sampling_blocks(net: nn.Module, batch: Tensor) -> list[tuple[str, Tensor, Tensor, tuple[int, int]]]:
    """Each deformable block's sampling for a batch of one, with its stage's feature-map size."""
    features, samplings = net.forward_sampling(batch)
    return [
        (
            f"stage {s.stage + 1} block {s.block}",
            s.pos[0].float().cpu(),
            s.reference[0].float().cpu(),
            tuple(features[s.stage].shape[-2:]),
        )
        for s in samplings
    ]


@torch.no_grad()
def attention_figures(net: nn.Module, images: Sequence[Tensor], titles: Sequence[str]) -> list[tuple[str, Figure]]:
    """Named figures (``<i>_gates``, ``<i>_sampling``) for each (C, H, W) model input, from eval forwards."""
    was_training = net.training
    net.eval()
    figures: list[tuple[str, Figure]] = []
    device = next(net.parameters()).device
    try:
        for i, (image, title) in enumerate(zip(images, titles)):
            batch = image.unsqueeze(0).to(device)
            picture = display_image(image)
            if has_gates(net):
                figures.append((f"{i}_gates", gate_figure(picture, _gate_maps(net, batch), title)))
            if has_sampling(net):
                figures.append((f"{i}_sampling", sampling_figure(picture, _sampling_blocks(net, batch), title)))
    finally:
        net.train(was_training)
    return figures


def save_figures(figures: Sequence[tuple[str, Figure]], folder: Path) -> list[Path]:
    """Write each figure as ``<folder>/<name>.png`` and release it; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures:
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
