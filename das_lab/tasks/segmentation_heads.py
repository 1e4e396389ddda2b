"""Decode heads of the DAT++ segmentation models, with the layers of mmsegmentation's configs.

- ``UPerHead`` (UperNet): pyramid pooling (scales 1, 2, 3, 6) on the last map, an FPN over all
  maps (1x1 laterals, 3x3 outputs), the levels upsampled to stride 4, concatenated and fused by a
  3x3 convolution; 512 channels in the official configs.
- ``FCNHead``: the auxiliary head on stage 3 (one 3x3 convolution, 256 channels).
- ``SemanticFPNHead`` (Semantic FPN): an FPN neck (256 channels, torchvision's), then per level
  3x3 convolutions with 2x upsampling until stride 4, summed; 128 channels.
Every convolution but the classifier is conv + norm + ReLU; the classifier is dropout (0.1) and a
1x1 convolution. Heads return logits at the resolution of their finest input.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

NORMS: dict[str, Optional[type[nn.Module]]] = {"batch": nn.BatchNorm2d, "none": None}


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize without corner alignment, as mmseg's heads and inference do."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> nn.Module:
    """mmcv's ConvModule: convolution (no bias under a norm), norm, ReLU."""
    if norm not in NORMS:
        raise ValueError(f"task.norm={norm!r}: expected one of {sorted(NORMS)}")
    return Conv2dNormActivation(
        in_channels, out_channels, kernel_size, norm_layer=NORMS[norm], activation_layer=nn.ReLU
    )


def classifier(channels: int, num_classes: int, dropout: float) -> nn.Module:
    """mmseg's ``cls_seg``: dropout of whole channels, then a 1x1 convolution to class logits."""
    return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: the map, plus its averages over 1x1, 2x2, ... grids, fused by a 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int], norm: str) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_norm_act(in_channels, channels, 1, norm))
            for scale in scales
        )
        self.bottleneck = conv_norm_act(in_channels + len(scales) * channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(stage(x), x.shape[-2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerHead(nn.Module):
    """UperNet's decode head over multi-scale maps (finest first)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int],
        dropout: float,
        norm: str,
    ) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(conv_norm_act(c, channels, 1, norm) for c in in_channels[:-1])
        self.outputs = nn.ModuleList(conv_norm_act(channels, channels, 3, norm) for _ in in_channels[:-1])
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales, norm)
        self.fuse = conv_norm_act(len(in_channels) * channels, channels, 3, norm)
        self.classifier = classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [lateral(x) for lateral, x in zip(self.laterals, features)] + [self.ppm(features[-1])]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.outputs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.classifier(self.fuse(torch.cat([outs[0], *(resize(x, size) for x in outs[1:])], dim=1)))


class FCNHead(nn.Module):
    """mmseg's FCNHead with ``num_convs`` 3x3 convolutions on one map (UperNet's auxiliary head)."""

    def __init__(
        self, in_channels: int, channels: int, num_classes: int, num_convs: int, dropout: float, norm: str
    ) -> None:
        super().__init__()
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(conv_norm_act(a, b, 3, norm) for a, b in zip(widths, widths[1:])))
        self.classifier = classifier(widths[-1], num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x))


class SemanticFPNHead(nn.Module):
    """Semantic FPN (Kirillov et al.): FPN neck, then every level brought to the finest stride and summed."""

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        neck_channels: int,
        channels: int,
        num_classes: int,
        dropout: float,
        norm: str,
    ) -> None:
        super().__init__()
        self.neck = FeaturePyramidNetwork(list(in_channels), neck_channels)
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = max(1, int(math.log2(stride) - math.log2(strides[0])))
            layers: list[nn.Module] = []
            for k in range(steps):
                layers.append(conv_norm_act(neck_channels if k == 0 else channels, channels, 3, norm))
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.classifier = classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        levels = list(self.neck(OrderedDict((str(i), x) for i, x in enumerate(features))).values())
        out = self.scale_heads[0](levels[0])
        for head, x in zip(self.scale_heads[1:], levels[1:]):
            out = out + resize(head(x), out.shape[-2:])
        return self.classifier(out)
