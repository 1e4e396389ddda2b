"""ResNets with DAS gates, plain ResNets and attention baselines (SE, CBAM, ECA, GC) in one harness.

All variants are timm's ``ResNet`` (torchvision stem: 7x7 conv + max-pool; key names ``conv1``,
``bn1``, ``layer1.0.conv1``, ..., ``fc``, identical to torchvision's), so ImageNet checkpoints of
the plain network load into every variant; keys of added gates are reported as new.

Baselines use timm's own attention layers (``timm.layers.create_attn``: ``se``, ``cbam``, ``eca``,
``gc``) in the block's attention slot (after the last conv + bn, before the residual add), which
reproduces timm's ``seresnet50`` exactly (28,088,024 parameters).

DAS gate placement (the main ablation axis):

- ``gate_stages``: any subset of stages 1..4 (``[]`` is the plain network);
- ``gate_position``:
  ``stage_end``: one gate on the output of the stage's last block (keys ``stage_gates.<s>.*``);
  ``block``: a gate in every block of the stage, after the last conv + bn and before the residual
  add, where SE sits (timm's attention slot, keys ``layer<s>.<b>.se.*``; cannot be combined with
  ``attn_layer``);
  ``skip``: a gate on every block's shortcut branch, after the projection when there is one (keys
  ``layer<s>.<b>.downsample.*``, after the projection's ``.0``/``.1``);
- ``offset_groups``: one int, or one per stage 1..4 (entries of ungated stages are not used).

Default DAS-ResNet-50 (``das_resnet50``, ``conf/model/das_resnet50.yaml``): one gate after stage
3 (``gate_stages=[3]``, ``stage_end``) with ``reduction=1/64`` (16 hidden channels), 3x3 depthwise,
3x3 deformable, 1 offset group, no modulation, LayerNorm + GELU, ``gate_mode=multiply``. At 224 px
it costs 4.12 GFLOPs and 25.74 M parameters against ResNet-50's 4.09 / 25.56 M, CBAM's 4.10 /
28.07 M, SE's 4.09 / 28.09 M and GC's 4.11 / 30.62 M (``benchmarks/model_table.py``): every one
reads "4.1 GFLOPs", as in the paper's claim of similar or fewer FLOPs than CNN attention, with
fewer added parameters than SE/CBAM/GC. Why this point: a stage_end gate costs about
``10 * alpha * C^2 * H * W`` MACs, the same at every stage of a ResNet, so the budget buys one
gate at alpha = 1/64; stage 3 (14x14 at 224 px) is fine enough for deformable sampling to pick
out object parts and coarse enough for its 3x3 kernel to reach across the object, and the
parameters it adds (~C^2 / 6) are 4x fewer than on stage 4. Gates on more stages or wider gates
(``[2, 3]`` at alpha 1/16: +0.27 GFLOPs) are one override away and are what the ablation sweeps
explore. The other depths keep 16 hidden channels on stage 3 (alpha 1/16 for basic blocks).

Registered names (timm registry): ``das_resnet{18,34,50,101}``, ``das_resnet_tiny``,
``resnet_tiny``, ``{se,cbam,eca,gc}_resnet{18,50,101}`` and the plain ``daslab_resnet{18,34,50,101}``
(prefixed because timm already registers ``resnet50`` etc.; the config files keep the short names
``model=resnet50``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from timm.models import register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn

from das_lab.models.das import (
    DASGate,
    OffsetGroups,
    check_gate_stages,
    gate_names,
    stage_end_gates,
    stage_offset_groups,
)
from das_lab.models.weights import entrypoint_kwargs, load_weights

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
GATE_POSITIONS = ("stage_end", "block", "skip")
ATTN_LAYERS = ("se", "cbam", "eca", "gc")
STAGE_STRIDES = (4, 8, 16, 32)


class DASResNet(ResNet):
    """ResNet (torchvision key names) with optional timm attention and DAS gates, backbone contract."""

    def __init__(
        self,
        num_classes: int = 1000,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        channels: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        in_chans: int = 3,
        attn_layer: Optional[str] = None,
        gate_stages: Sequence[int] = (),
        gate_position: str = "stage_end",
        reduction: float = 0.0625,
        dw_kernel_size: int = 3,
        offset_groups: OffsetGroups = 1,
        deform_kernel_size: int = 3,
        modulated: bool = False,
        norm: str = "layer",
        act: str = "gelu",
        gate_mode: str = "multiply",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        checkpoint: Optional[str] = None,
        checkpoint_strict: bool = True,
    ) -> None:
        if block not in BLOCKS:
            raise ValueError(f"model.block={block!r} is not supported; choose one of {', '.join(BLOCKS)}")
        if attn_layer is not None and attn_layer not in ATTN_LAYERS:
            raise ValueError(f"model.attn_layer={attn_layer!r} is not supported; choose null or one of {ATTN_LAYERS}")
        if gate_position not in GATE_POSITIONS:
            raise ValueError(f"model.gate_position={gate_position!r} is not supported; choose one of {GATE_POSITIONS}")
        if len(layers) != 4 or len(channels) != 4:
            raise ValueError(f"model.layers={list(layers)} and model.channels={list(channels)} need 4 entries each")
        super().__init__(
            block=BLOCKS[block],
            layers=tuple(layers),
            channels=tuple(channels),
            num_classes=num_classes,
            in_chans=in_chans,
            stem_width=stem_width,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            block_args=dict(attn_layer=attn_layer),
        )
        self.stage_channels = tuple(c * BLOCKS[block].expansion for c in channels)
        self.stage_strides = STAGE_STRIDES
        gate_args: dict[str, Any] = dict(
            reduction=reduction,
            dw_kernel_size=dw_kernel_size,
            deform_kernel_size=deform_kernel_size,
            modulated=modulated,
            norm=norm,
            act=act,
            gate_mode=gate_mode,
        )
        if gate_position == "stage_end":
            self.stage_gates = stage_end_gates(self.stage_channels, gate_stages, offset_groups, **gate_args)
        else:
            self.stage_gates = nn.ModuleDict()
            self._add_block_gates(gate_stages, gate_position, offset_groups, attn_layer, gate_args)
        if checkpoint:
            load_weights(self, checkpoint, strict=checkpoint_strict, new_modules=gate_names(self))

    def _add_block_gates(
        self,
        gate_stages: Sequence[int],
        position: str,
        offset_groups: OffsetGroups,
        attn_layer: Optional[str],
        gate_args: dict[str, Any],
    ) -> None:
        if position == "block" and attn_layer is not None and gate_stages:
            raise ValueError(
                f"model.gate_position=block uses the block's attention slot, already taken by "
                f"model.attn_layer={attn_layer}; use gate_position=stage_end/skip or attn_layer=null"
            )
        groups = stage_offset_groups(offset_groups, 4)
        for stage in check_gate_stages(gate_stages, 4):
            for blk in getattr(self, f"layer{stage}"):
                gate = DASGate(self.stage_channels[stage - 1], offset_groups=groups[stage - 1], **gate_args)
                if position == "block":
                    blk.se = gate
                elif blk.downsample is None:
                    blk.downsample = gate
                else:
                    blk.downsample.append(gate)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """One feature map per stage (strides 4, 8, 16, 32), after that stage's gate if any."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        features = []
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
            if str(stage) in self.stage_gates:
                x = self.stage_gates[str(stage)](x)
            features.append(x)
        return features

    def forward_head(self, features: list[Tensor], pre_logits: bool = False) -> Tensor:
        """Logits (or pooled features when num_classes=0 or pre_logits) from the last stage map."""
        return super().forward_head(features[-1], pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.forward_head(self.forward_features(x))


DEPTHS = {
    "18": dict(block="basic", layers=(2, 2, 2, 2)),
    "34": dict(block="basic", layers=(3, 4, 6, 3)),
    "50": dict(block="bottleneck", layers=(3, 4, 6, 3)),
    "101": dict(block="bottleneck", layers=(3, 4, 23, 3)),
}
# One stage-3 gate with 16 hidden channels at every depth (alpha = 16 / stage-3 channels).
DAS_REDUCTION = {"basic": 0.0625, "bottleneck": 0.015625}
# 64 px digits (~5k training images): 0.33 M parameters, 16 MMACs per image; one epoch at batch 64
# measured 12 s (resnet_tiny) / 14 s (das_resnet_tiny) of single-core CPU time, ~7-9 s on 2 idle cores.
TINY = dict(block="basic", layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16)

VARIANTS: dict[str, dict[str, Any]] = {
    **{f"daslab_resnet{d}": dict(arch) for d, arch in DEPTHS.items()},
    **{
        f"das_resnet{d}": dict(arch, gate_stages=(3,), reduction=DAS_REDUCTION[arch["block"]])
        for d, arch in DEPTHS.items()
    },
    **{
        f"{attn}_resnet{d}": dict(DEPTHS[d], attn_layer=attn)
        for attn in ATTN_LAYERS
        for d in ("18", "50", "101")
    },
    "resnet_tiny": dict(TINY),
    "das_resnet_tiny": dict(TINY, gate_stages=(2, 3), reduction=0.25),
}


def _register(name: str, defaults: dict[str, Any]) -> None:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> DASResNet:
        return DASResNet(**{**defaults, **entrypoint_kwargs(name, pretrained, kwargs)})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{name}: DASResNet({', '.join(f'{k}={v}' for k, v in defaults.items())})."
    register_model(entrypoint)


for _name, _defaults in VARIANTS.items():
    _register(_name, _defaults)
