"""FLOP counting that also sees deformable convolution and grid sampling.

``torch.utils.flop_counter`` counts convolutions and matmuls only; DAS's deformable
convolution (``torchvision::deform_conv2d``) and DAT++'s bilinear sampling
(``aten::grid_sampler_2d``) would be silently uncounted. The formulas registered here
count multiply-accumulates x 2, the counter's convention, so ``count_flops(...) / 2``
gives the MACs that papers report as "FLOPs".
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

_BILINEAR_MACS_PER_SAMPLE = 4


def _shape(t: Any) -> list[int]:
    return list(t.shape) if hasattr(t, "shape") else list(t)


@register_flop_formula(torch.ops.torchvision.deform_conv2d)
def _deform_conv2d_flops(
    input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, offset_groups,
    use_mask, *, out_shape=None, **kwargs,
) -> int:
    """Convolution MACs plus the bilinear interpolation of every sampled input value."""
    batch, in_ch = _shape(input)[:2]
    out_ch, in_per_group, kh, kw = _shape(weight)
    out_h, out_w = _shape(out_shape)[2:]
    positions = batch * out_h * out_w
    conv_macs = positions * out_ch * in_per_group * kh * kw
    sampling_macs = positions * in_ch * kh * kw * _BILINEAR_MACS_PER_SAMPLE
    modulation_macs = positions * in_ch * kh * kw if use_mask else 0
    return 2 * (conv_macs + sampling_macs + modulation_macs)


@register_flop_formula(torch.ops.aten.grid_sampler_2d)
def _grid_sampler_2d_flops(input, grid, *args, out_shape=None, **kwargs) -> int:
    """Bilinear sampling: four weighted reads per output value and channel."""
    batch, channels = _shape(input)[:2]
    out_h, out_w = _shape(grid)[1:3]
    return 2 * batch * channels * out_h * out_w * _BILINEAR_MACS_PER_SAMPLE


def count_flops(model: nn.Module, input_shape: Sequence[int], *, device: str | torch.device = "cpu") -> int:
    """FLOPs (2 x MACs) of one forward pass of ``model`` on a zero tensor of ``input_shape``."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(*input_shape, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def count_gmacs(model: nn.Module, input_shape: Sequence[int], *, device: str | torch.device = "cpu") -> float:
    """Giga multiply-accumulates, the unit papers call "GFLOPs" (ResNet-50 at 224: 4.1)."""
    return count_flops(model, input_shape, device=device) / 2e9


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not), as papers report them."""
    return sum(p.numel() for p in model.parameters())
