"""The DAS attention gate: a fully convolutional, deformable, O(n) feature re-weighting.

DAS (Salajegheh, Asadi, Saryazdi, Mudur, 2023, arXiv 2311.12091) released no code, so every
design choice of this implementation is spelled out here and exposed as a constructor argument
(which is also the ``model.*`` config key of every backbone that uses the gate):

``X (B, C, H, W)``
  1. depthwise ``dw_kernel_size`` x ``dw_kernel_size`` convolution (C -> C, no bias);
  2. pointwise 1x1 convolution C -> ``hidden = round(reduction * C)`` (no bias);
     steps 1-2 are the depthwise-separable convolution that keeps the gate cheap;
  3. ``norm`` over channels (``layer``: channel LayerNorm, the default; ``batch``; ``none``),
     then ``act`` (``gelu`` default, ``relu``, ``silu``);
  4. a ``deform_kernel_size`` x ``deform_kernel_size`` convolution (same size, zero-initialised,
     with bias) predicts, from these same hidden features, the sampling offsets of the deformable
     convolution: ``2 * offset_groups * k * k`` channels in torchvision's layout ((dy, dx) pairs,
     in pixels, per offset group and kernel tap); with ``modulated=True`` it also predicts
     ``offset_groups * k * k`` modulation logits, passed through a sigmoid (DCNv2);
  5. deformable ``k x k`` convolution ``hidden -> C`` (``torchvision.ops.DeformConv2d``, i.e.
     ``torchvision.ops.deform_conv2d``; no bias) that samples the hidden features at the
     predicted locations;
  6. ``norm`` over the C channels, then a sigmoid: the gate ``A`` in [0, 1], one value per
     channel and pixel;
  7. ``gate_mode=multiply``: ``X * A``; ``gate_mode=residual``: ``X + X * A`` (never suppresses
     the input completely, which suits inserting the gate into a pretrained network).

Because the offset predictor starts at zero, a freshly built gate is an ordinary convolutional
gate (with ``modulated=True`` every tap starts at weight 0.5); the offsets are learned from there.
Every step is a convolution, so cost and memory grow linearly with the number of pixels.

Maps for visualisation come from the same forward pass: set ``gate.record_maps = True`` (or use
:func:`capture_gate_maps` on a whole network) and each forward stores a detached
:class:`GateMaps` (gate, offsets, mask) in ``gate.last_maps``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from timm.layers import LayerNorm2d
from timm.models import register_notrace_module
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torchvision.ops import DeformConv2d

from das_lab.errors import NonFiniteError

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "layer": LayerNorm2d,
    "batch": nn.BatchNorm2d,
    "none": lambda channels: nn.Identity(),
}
ACTS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
GATE_MODES = ("multiply", "residual")

OffsetGroups = Union[int, Sequence[int]]


@dataclass
class GateMaps:
    """What one gate computed in its last forward, for attention and sampling-point plots."""

    gate: Tensor  # (B, C, H, W), values in [0, 1]
    offsets: Tensor  # (B, 2 * offset_groups * k * k, H, W), (dy, dx) pairs in pixels
    mask: Optional[Tensor]  # (B, offset_groups * k * k, H, W) in [0, 1], or None when not modulated


def _choice(key: str, value: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"model.{key}={value!r} is not supported; choose one of {', '.join(options)}")
    return value


def _odd_kernel(key: str, value: int) -> int:
    if value < 1 or value % 2 == 0:
        raise ValueError(f"model.{key}={value} must be a positive odd kernel size (e.g. 3) so the map keeps its size")
    return value


@register_notrace_module  # one FX leaf: the deformable conv's shape checks cannot be traced
class DASGate(nn.Module):
    """Deformable, depthwise-separable sigmoid gate that re-weights a feature map (see module doc)."""

    def __init__(
        self,
        channels: int,
        reduction: float = 0.25,
        dw_kernel_size: int = 3,
        offset_groups: int = 1,
        deform_kernel_size: int = 3,
        modulated: bool = False,
        norm: str = "layer",
        act: str = "gelu",
        gate_mode: str = "multiply",
    ) -> None:
        super().__init__()
        hidden = int(round(reduction * channels))
        if hidden < 1:
            raise ValueError(
                f"model.reduction={reduction} leaves {hidden} hidden channels for a {channels}-channel map; "
                f"choose reduction >= {1 / channels:.4g}"
            )
        if offset_groups < 1 or hidden % offset_groups:
            raise ValueError(
                f"model.offset_groups={offset_groups} does not divide the gate's {hidden} hidden channels "
                f"(model.reduction={reduction} x {channels} channels); choose a divisor of {hidden}"
            )
        _odd_kernel("dw_kernel_size", dw_kernel_size)
        k = _odd_kernel("deform_kernel_size", deform_kernel_size)
        self.gate_mode = _choice("gate_mode", gate_mode, GATE_MODES)
        norm_layer = NORMS[_choice("norm", norm, tuple(NORMS))]
        act_layer = ACTS[_choice("act", act, tuple(ACTS))]
        self.offset_groups = offset_groups
        self.modulated = modulated
        self.record_maps = False
        self.last_maps: Optional[GateMaps] = None

        self.dw = nn.Conv2d(
            channels, channels, dw_kernel_size, padding=dw_kernel_size // 2, groups=channels, bias=False
        )
        self.pw = nn.Conv2d(channels, hidden, 1, bias=False)
        self.norm1 = norm_layer(hidden)
        self.act = act_layer()
        per_tap = 3 if modulated else 2
        self.offset = nn.Conv2d(hidden, per_tap * offset_groups * k * k, k, padding=k // 2)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.deform = DeformConv2d(hidden, channels, k, padding=k // 2, bias=False)
        self.norm2 = norm_layer(channels)

    def _deform(self, hidden: Tensor, offsets: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The deformable conv; in float32 under CPU autocast, the one place its kernel lacks the dtype.

        torchvision registers no CPU autocast rule for deform_conv2d and its CPU kernel has no bf16
        (fp16 inputs would meet the fp32 weight), so the gate casts. On CUDA torchvision's own
        autocast rule already runs the op in float32 (its CUDA kernel has fp16 but no bf16) and
        returns the input's dtype, so the gate adds nothing there.
        """
        if not torch.jit.is_scripting():  # (a scripted gate is not compiled with this branch)
            if hidden.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    return self.deform(hidden.float(), offsets.float(), None if mask is None else mask.float())
        return self.deform(hidden, offsets, mask)

    @torch.jit.unused
    def _check_offsets(self, offsets: Tensor) -> None:
        """Stop on NaN/Inf offsets in eager CPU runs, where torchvision's kernel would crash the process.

        Compiled, exported and scripted graphs skip the check: it depends on the data, and they run
        the finished model, whose loss is checked by the training loop anyway. So do the shape-only
        fake tensors that FLOP counting traces (``das_lab.utils.flops``): they hold no values.
        """
        if offsets.device.type == "cpu" and not is_fake(offsets) and not torch.isfinite(offsets).all():
            raise NonFiniteError("the sampling offsets of a DAS gate")

    @torch.jit.unused
    def _record(self, gate: Tensor, offsets: Tensor, mask: Optional[Tensor]) -> None:
        self.last_maps = GateMaps(
            gate=gate.detach(), offsets=offsets.detach(), mask=None if mask is None else mask.detach()
        )

    def forward(self, x: Tensor) -> Tensor:
        """Gate ``x`` by its deformably sampled attention map."""
        hidden = self.act(self.norm1(self.pw(self.dw(x))))
        predicted = self.offset(hidden)
        n_offsets = 2 * self.offset_groups * self.deform.kernel_size[0] * self.deform.kernel_size[1]
        offsets = predicted[:, :n_offsets]
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            self._check_offsets(offsets)
        mask = predicted[:, n_offsets:].sigmoid() if self.modulated else None
        gate = torch.sigmoid(self.norm2(self._deform(hidden, offsets, mask)))
        if self.record_maps and not torch.jit.is_scripting():
            self._record(gate, offsets, mask)
        gated = x * gate
        return gated if self.gate_mode == "multiply" else x + gated


def stage_offset_groups(offset_groups: OffsetGroups, num_stages: int) -> list[int]:
    """One offset-group count per stage, from a single int or a per-stage list."""
    if isinstance(offset_groups, int):
        return [offset_groups] * num_stages
    groups = [int(g) for g in offset_groups]
    if len(groups) != num_stages:
        raise ValueError(
            f"model.offset_groups={groups} has {len(groups)} entries; give one int or one per stage ({num_stages})"
        )
    return groups


def check_gate_stages(gate_stages: Sequence[int], num_stages: int) -> list[int]:
    """Validated, sorted stage numbers (1-based) that receive gates."""
    stages = sorted(int(s) for s in gate_stages)
    if len(set(stages)) != len(stages) or any(s < 1 or s > num_stages for s in stages):
        raise ValueError(
            f"model.gate_stages={list(gate_stages)} must be distinct stage numbers in 1..{num_stages} "
            f"(e.g. [2, 3]); use [] for the plain network"
        )
    return stages


def gate_names(model: nn.Module) -> list[str]:
    """Module names of all DAS gates in ``model`` (the new keys when loading a gate-less checkpoint)."""
    return [name for name, module in model.named_modules() if isinstance(module, DASGate)]


@contextmanager
def capture_gate_maps(model: nn.Module) -> Iterator[dict[str, GateMaps]]:
    """Collect every DAS gate's maps from the forward passes run inside the ``with`` block."""
    maps: dict[str, GateMaps] = {}
    gates = {name: model.get_submodule(name) for name in gate_names(model)}

    def hook(name: str) -> Callable[..., None]:
        def store(module: DASGate, inputs: object, output: object) -> None:
            maps[name] = module.last_maps

        return store

    handles = [gate.register_forward_hook(hook(name)) for name, gate in gates.items()]
    for gate in gates.values():
        gate.record_maps = True
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
        for gate in gates.values():
            gate.record_maps = False
            gate.last_maps = None


def stage_end_gates(
    stage_channels: Sequence[int], gate_stages: Sequence[int], offset_groups: OffsetGroups, **gate_args: object
) -> nn.ModuleDict:
    """Gates applied to the output of the chosen stages, keyed by stage number ("1".."N")."""
    stages = check_gate_stages(gate_stages, len(stage_channels))
    groups = stage_offset_groups(offset_groups, len(stage_channels))
    return nn.ModuleDict(
        {str(s): DASGate(stage_channels[s - 1], offset_groups=groups[s - 1], **gate_args) for s in stages}
    )
