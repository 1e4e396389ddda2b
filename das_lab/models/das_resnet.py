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

timm contract: ``forward_features`` returns the last stage map (after its gate),
``forward_intermediates`` / ``features_only`` return the stem (stride 2) and the four stage maps
(strides 4-32) after their gates, ``set_grad_checkpointing`` checkpoints every block.

Registered names (timm registry): ``das_resnet{18,34,50,101}``, ``das_resnet_tiny``,
``resnet_tiny``, ``{se,cbam,eca,gc}_resnet{18,50,101}`` and the plain ``daslab_resnet{18,34,50,101}``
(prefixed because timm already registers ``resnet50`` etc.; the config files keep the short names
``model=resnet50``). Their hyper-parameters are those of the config files.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn

from das_lab.models.builder import FeatureLevels, create_variant
from das_lab.models.das import (
    DASGate,
    OffsetGroups,
    check_gate_stages,
    gate_names,
    stage_end_gates,
    stage_offset_groups,
)
from das_lab.models.weights import StateDict, fill_fresh

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
GATE_POSITIONS = ("stage_end", "block", "skip")
ATTN_LAYERS = ("se", "cbam", "eca", "gc")
STAGES = ("1", "2", "3", "4")


class DASResNet(FeatureLevels, ResNet):
    """timm ResNet (torchvision key names) with optional timm attention and DAS gates.

    ``FeatureLevels`` comes first so its ``forward_intermediates``/``prune_intermediate_layers``
    (which run the gates) replace timm ResNet's (which do not).
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        num_classes: int = 1000,
        channels: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        in_chans: int = 3,
        global_pool: str = "avg",
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
            global_pool=global_pool,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            block_args=dict(attn_layer=attn_layer),
        )
        widths = tuple(c * BLOCKS[block].expansion for c in channels)
        gate_args: dict[str, Any] = dict(
            reduction=reduction,
            dw_kernel_size=dw_kernel_size,
            deform_kernel_size=deform_kernel_size,
            modulated=modulated,
            norm=norm,
            act=act,
            gate_mode=gate_mode,
        )
        # Every stage has an entry (identity when ungated) so the forward is the same straight line for all.
        self.stage_gates = nn.ModuleDict({s: nn.Identity() for s in STAGES})
        if gate_position == "stage_end":
            self.stage_gates.update(stage_end_gates(widths, gate_stages, offset_groups, **gate_args))
        else:
            self._add_block_gates(widths, gate_stages, gate_position, offset_groups, attn_layer, gate_args)

    def _add_block_gates(
        self,
        widths: Sequence[int],
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
                gate = DASGate(widths[stage - 1], offset_groups=groups[stage - 1], **gate_args)
                if position == "block":
                    blk.se = gate
                elif blk.downsample is None:
                    blk.downsample = gate
                else:
                    blk.downsample.append(gate)

    def fresh_modules(self) -> list[str]:
        """The DAS gates: a plain ResNet checkpoint has no weights for them."""
        return gate_names(self)

    def filter_checkpoint(self, state: StateDict) -> StateDict:
        """torchvision/timm ResNet keys are das-lab's: nothing to rename (see :func:`checkpoint_filter_fn`)."""
        return state

    def _level(self, level: int, x: Tensor) -> Tensor:
        """Level 0: the stem (stride 2); 1-4: (max-pool,) stage ``level`` and its gate, blocks checkpointed if on."""
        if level == 0:
            return self.act1(self.bn1(self.conv1(x)))
        layer = getattr(self, f"layer{level}")
        x = self.maxpool(x) if level == 1 else x
        x = checkpoint_seq(layer, x) if self.grad_checkpointing and not torch.jit.is_scripting() else layer(x)
        return self.stage_gates[str(level)](x)

    def _prune_levels_after(self, level: int) -> None:
        for index in range(level + 1, 5):
            setattr(self, f"layer{index}", nn.Identity())
            self.stage_gates[str(index)] = nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage map (stride 32), after every gate."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._forward_levels(x)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.stage_gates["1"](self.layer1(x))
        x = self.stage_gates["2"](self.layer2(x))
        x = self.stage_gates["3"](self.layer3(x))
        return self.stage_gates["4"](self.layer4(x))


def checkpoint_filter_fn(state: StateDict, model: DASResNet) -> StateDict:
    """A torchvision/timm ResNet (or das-lab) state_dict for ``model``: same keys; DAS gates start fresh."""
    return fill_fresh(model.filter_checkpoint(state), model)


# (timm name, config file, weights of the plain network whose keys it shares)
_TV = "torchvision ImageNet-1k weights of the plain ResNet-{}; DAS gates/attention layers start fresh"
VARIANTS: tuple[tuple[str, str, Optional[str]], ...] = (
    *((f"daslab_resnet{d}", f"resnet{d}", d) for d in ("18", "34", "50", "101")),
    *((f"das_resnet{d}", f"das_resnet{d}", d) for d in ("18", "34", "50", "101")),
    *((f"{a}_resnet{d}", f"{a}_resnet{d}", None) for a in ATTN_LAYERS for d in ("18", "50", "101")),
    ("resnet_tiny", "resnet_tiny", None),
    ("das_resnet_tiny", "das_resnet_tiny", None),
)


def _cfg(depth: Optional[str], tiny: bool) -> dict[str, Any]:
    size = 64 if tiny else 224
    cfg: dict[str, Any] = dict(
        num_classes=1000,
        input_size=(3, size, size),
        pool_size=(size // 32, size // 32),
        crop_pct=0.875,
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="conv1",
        classifier="fc",
        license="mit",
        paper_ids="arXiv:2311.12091",
        paper_name="DAS: A Deformable Attention to Capture Salient Information in CNNs",
    )
    if depth is not None:
        cfg.update(hf_hub_id=f"timm/resnet{depth}.tv_in1k", license="bsd-3-clause", notes=(_TV.format(depth),))
    return cfg


default_cfgs = generate_default_cfgs(
    {(f"{name}.tv_in1k" if depth else name): _cfg(depth, "tiny" in name) for name, _, depth in VARIANTS}
)


def _register(name: str, config: str) -> None:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> DASResNet:
        return create_variant(
            DASResNet, name, config, pretrained, kwargs, checkpoint_filter_fn, lambda m: (0, 1, 2, 3, 4)
        )

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{name}: DASResNet with the arguments of conf/model/{config}.yaml."
    register_model(entrypoint)


for _name, _config, _ in VARIANTS:
    _register(_name, _config)
