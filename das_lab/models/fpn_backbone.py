"""Any timm model as a torchvision detection backbone: its stride 4-32 maps through an FPN.

One adapter serves every model with timm's feature API (``feature_info`` and
``forward_intermediates``): das-lab's DAS-ResNets (maps after their gates) and DAT++ (through its
stage norms when built with ``out_norms``), and any timm model (``model=timm model.name=resnet50``,
``convnext_tiny``, ``swin_tiny_patch4_window7_224``), so no detector is wired per model. FPN
"stages" 1-4 are the model's feature levels of stride 4, 8, 16 and 32.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

_EXTRA_BLOCKS = ("maxpool", "p6p7")
STAGE_STRIDES = (4, 8, 16, 32)


def check_backbone_contract(net: nn.Module) -> None:
    """Fail early, naming what is missing, when a model cannot feed an FPN."""
    missing = [name for name in ("forward_intermediates", "feature_info") if not hasattr(net, name)]
    if missing:
        raise TypeError(
            f"{type(net).__name__} lacks {', '.join(missing)}: detection takes multi-scale features through timm's "
            "API; use a timm model (model=timm model.name=<timm name>) or a das-lab model"
        )
    stage_levels(net)


def stage_levels(net: nn.Module) -> tuple[int, int, int, int]:
    """Indices into ``net.feature_info`` of the stride 4, 8, 16 and 32 maps (FPN stages 1-4)."""
    reductions = [info["reduction"] for info in net.feature_info]
    missing = [stride for stride in STAGE_STRIDES if stride not in reductions]
    if missing:
        raise ValueError(
            f"{type(net).__name__} has feature maps of strides {reductions}, but detection needs strides "
            f"{list(STAGE_STRIDES)}; choose a hierarchical backbone (ResNet, ConvNeXt, Swin, DAT++)"
        )
    return tuple(len(reductions) - 1 - reductions[::-1].index(stride) for stride in STAGE_STRIDES)


def stage_channels(net: nn.Module) -> tuple[int, ...]:
    """Channels of FPN stages 1-4."""
    return tuple(net.feature_info[level]["num_chs"] for level in stage_levels(net))


def stage_maps(net: nn.Module, x: torch.Tensor, stages: Sequence[int]) -> list[torch.Tensor]:
    """The maps of FPN ``stages`` (1-4) of ``x``, through timm's ``forward_intermediates``."""
    levels = stage_levels(net)
    return net.forward_intermediates(
        x, indices=[levels[s - 1] for s in stages], stop_early=True, output_fmt="NCHW", intermediates_only=True
    )


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by torchvision's FrozenBatchNorm2d holding the same statistics.

    Detection batches (2 images per device) are too small for batch statistics, so the
    ImageNet statistics and affine parameters are kept fixed, as in the standard 1x schedule.
    """
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def freeze_stages(net: nn.Module, frozen_stages: int, probe_size: int = 224) -> list[str]:
    """Stop training the stem and the first ``frozen_stages`` stages; returns the frozen names.

    The parameters of "stem + stages 1..k" are found generically, as those the k-th stage map
    depends on in autograd, so the same option works for every backbone layout.
    """
    if frozen_stages == 0:
        return []
    if not 0 <= frozen_stages <= len(STAGE_STRIDES):
        raise ValueError(f"task.frozen_stages={frozen_stages}: expected 0 (train all) to 4 (all stages)")
    named = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    was_training = net.training
    net.eval()
    with torch.enable_grad():
        probe = torch.zeros(1, 3, probe_size, probe_size, device=named[0][1].device)
        (feature,) = stage_maps(net, probe, [frozen_stages])
        grads = torch.autograd.grad(feature.sum(), [p for _, p in named], allow_unused=True)
    net.train(was_training)
    frozen = [name for (name, p), grad in zip(named, grads) if grad is not None]
    for name, p in named:
        if name in frozen:
            p.requires_grad_(False)
    return frozen


class FPNBackbone(nn.Module):
    """Backbone stages ``returned_stages`` -> FPN maps, the input torchvision detectors expect.

    Exposes ``out_channels`` like torchvision's ``BackboneWithFPN``. ``extra_block`` adds the
    coarser levels: ``maxpool`` (P6 by subsampling, Faster/Mask R-CNN) or ``p6p7`` (two strided
    convolutions on P5, RetinaNet).
    """

    def __init__(
        self,
        net: nn.Module,
        returned_stages: Sequence[int] = (1, 2, 3, 4),
        out_channels: int = 256,
        extra_block: str = "maxpool",
    ) -> None:
        super().__init__()
        check_backbone_contract(net)
        if not returned_stages or any(not 1 <= s <= 4 for s in returned_stages):
            raise ValueError(f"returned_stages={tuple(returned_stages)}: expected stage numbers between 1 and 4")
        if list(returned_stages) != sorted(set(returned_stages)):
            raise ValueError(f"returned_stages={tuple(returned_stages)}: expected increasing, distinct stage numbers")
        if extra_block not in _EXTRA_BLOCKS:
            raise ValueError(f"extra_block={extra_block!r}: expected one of {_EXTRA_BLOCKS}")
        self.net = net
        self.returned_stages = tuple(returned_stages)
        self.out_channels = out_channels
        extra: ExtraFPNBlock = (
            LastLevelMaxPool() if extra_block == "maxpool" else LastLevelP6P7(out_channels, out_channels)
        )
        self.fpn = FeaturePyramidNetwork(
            [stage_channels(net)[s - 1] for s in self.returned_stages], out_channels, extra_blocks=extra
        )

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides of the returned FPN levels, extra levels included (each halves the resolution)."""
        base = tuple(STAGE_STRIDES[s - 1] for s in self.returned_stages)
        extra = 1 if isinstance(self.fpn.extra_blocks, LastLevelMaxPool) else 2
        return base + tuple(base[-1] * 2 ** (i + 1) for i in range(extra))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = stage_maps(self.net, x, self.returned_stages)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
