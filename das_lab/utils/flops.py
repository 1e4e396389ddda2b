"""FLOP counting that also sees deformable convolution, grid sampling and CPU attention.

``torch.utils.flop_counter`` counts convolutions, matmuls and the GPU attention kernels only;
DAS's deformable convolution (``torchvision::deform_conv2d``), DAT++'s bilinear sampling
(``aten::grid_sampler_2d``, and ``aten::cudnn_grid_sampler`` that ``F.grid_sample`` picks on
CUDA) and ``F.scaled_dot_product_attention`` on the CPU (``aten::_scaled_dot_product_flash_attention_for_cpu``)
would be silently uncounted. The formulas registered here count multiply-accumulates x 2, the
counter's convention, so ``count_flops(...) / 2`` gives the MACs that papers report as "FLOPs".
Element-wise operations (norms, activations, softmax) are not counted, as in those papers.
What a run counts is the backbone on a square image, unless its task declares more (``CostedTask``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

log = logging.getLogger(__name__)

_BILINEAR_MACS_PER_SAMPLE = 4


def _shape(t: Any) -> list[int]:
    return list(t.shape) if hasattr(t, "shape") else list(t)


def _unregistered(*ops: Any) -> list[Any]:
    """The ops torch has no formula for yet (a newer torch's own formula takes precedence)."""
    return [op for op in ops if op not in flop_registry]


@register_flop_formula(torch.ops.torchvision.deform_conv2d)
def _deform_conv2d_flops(
    input,
    weight,
    offset,
    mask,
    bias,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    groups,
    offset_groups,
    use_mask,
    *,
    out_shape=None,
    **kwargs,
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


@register_flop_formula(_unregistered(torch.ops.aten.grid_sampler_2d, torch.ops.aten.cudnn_grid_sampler))
def _grid_sampler_2d_flops(input, grid, *args, out_shape=None, **kwargs) -> int:
    """Bilinear sampling: four weighted reads per output value and channel."""
    batch, channels = _shape(input)[:2]
    out_h, out_w = _shape(grid)[1:3]
    return 2 * batch * channels * out_h * out_w * _BILINEAR_MACS_PER_SAMPLE


@register_flop_formula(
    _unregistered(
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
        torch.ops.aten._scaled_dot_product_fused_attention_overrideable,
    )
)
def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Attention on the CPU (and other fused backends): the same count as torch's GPU kernels."""
    return sdpa_flop_count(query, key, value)


@register_flop_formula(
    _unregistered(
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
        torch.ops.aten._scaled_dot_product_fused_attention_overrideable_backward,
    )
)
def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Backward of the attention kernels above, as torch counts its GPU kernels' backward."""
    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(model: nn.Module, input_shape: Sequence[int], *, device: str | torch.device = "cpu") -> int:
    """FLOPs (2 x MACs) of one forward pass of ``model`` on an image of ``input_shape``.

    The pass runs on fake tensors (shapes, no values): a segmentor at 2048x512 is counted in
    seconds instead of minutes of CPU. A forward that fake tensors cannot run (one that depends on
    values, e.g. a detector's NMS, or eager flex_attention) is counted on a real zero image instead,
    which also raises the model's own errors.
    """
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            return _forward_flops(model, torch.empty(*input_shape, device=device))
    except Exception as exc:  # any op fake tensors cannot run: the real pass below decides
        log.debug("counting FLOPs of %s on a real image: %s", type(model).__name__, exc)
    return _forward_flops(model, torch.zeros(*input_shape, device=device))


def _forward_flops(model: nn.Module, image: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(image)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def count_gmacs(model: nn.Module, input_shape: Sequence[int], *, device: str | torch.device = "cpu") -> float:
    """Giga multiply-accumulates, the unit papers call "GFLOPs" (ResNet-50 at 224: 4.1)."""
    return count_flops(model, input_shape, device=device) / 2e9


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not), as papers report them."""
    return sum(p.numel() for p in model.parameters())


@runtime_checkable
class CostedTask(Protocol):
    """A task module that names the network and input its papers count, when that is more than the backbone.

    mmsegmentation's papers count a segmentor's parameters with every head and its FLOPs (as
    GMACs) on one image at the test scale, 2048x512, where the auxiliary head does not run.
    """

    def cost_network(self) -> nn.Module:
        """The network whose parameters and FLOPs are reported."""
        ...

    def cost_input_size(self) -> tuple[int, int]:
        """(height, width) of the one image the FLOPs are counted on."""
        ...


def cost_subject(net: nn.Module, module: Any, image_size: Optional[int]) -> tuple[nn.Module, Optional[tuple[int, int]]]:
    """What a run's params and GFLOPs are counted on: a task's declaration, else ``net`` on a square ``image_size`` input.

    The size is None when there is nothing to count FLOPs at (no declaration and no ``image_size``).
    """
    if isinstance(module, CostedTask):
        return module.cost_network(), module.cost_input_size()
    return net, (image_size, image_size) if image_size else None
