"""MobileNetV2 with DAS gates after chosen inverted-residual stages (torchvision key names), as a timm model.

torchvision's MobileNetV2 (keys ``features.<i>.*``, ``classifier.1.*``) so its ImageNet
checkpoints load; gates live under ``stage_gates.<s>.*`` and start fresh. The four stages end at
``features`` indices 3, 6, 13 and 18 (strides 4, 8, 16, 32; 24, 32, 96 and 1280 channels at
``width_mult=1``); with the stride-2 map after ``features[1]`` they are timm's five feature levels.
Default ``das_mobilenet_v2`` (``conf/model/das_mobilenet_v2.yaml``): gates after stages 2 and 3
(``reduction=0.25``: 8 and 24 hidden channels), cheap next to the network's 0.30 GFLOPs.
Gate arguments are those of :class:`das_lab.models.das.DASGate`.
"""

from typing import Any, Optional, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import MobileNetV2

from das_lab.models.builder import FeatureLevels, create_variant
from das_lab.models.das import OffsetGroups, gate_names, stage_end_gates
from das_lab.models.weights import StateDict, fill_fresh

LEVEL_ENDS = (1, 3, 6, 13, 18)  # last ``features`` index of each feature level (stride 2, then stages 1-4)
STAGES = ("1", "2", "3", "4")


class DASMobileNetV2(FeatureLevels, MobileNetV2):
    """torchvision MobileNetV2 with DAS gates on chosen stage outputs, following timm's model API."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        width_mult: float = 1.0,
        dropout: float = 0.2,
        gate_stages: Sequence[int] = (),
        reduction: float = 0.25,
        dw_kernel_size: int = 3,
        offset_groups: OffsetGroups = 1,
        deform_kernel_size: int = 3,
        modulated: bool = False,
        norm: str = "layer",
        act: str = "gelu",
        gate_mode: str = "multiply",
    ) -> None:
        super().__init__(num_classes=max(num_classes, 1), width_mult=width_mult, dropout=dropout)
        if in_chans != 3:
            stem = self.features[0][0]
            self.features[0][0] = nn.Conv2d(in_chans, stem.out_channels, 3, 2, 1, bias=False)
        widths = [self.features[i].out_channels for i in LEVEL_ENDS]
        self.num_features = self.head_hidden_size = widths[-1]
        self.feature_info = [
            dict(num_chs=c, reduction=2 ** (i + 1), module=f"features.{end}")
            for i, (c, end) in enumerate(zip(widths, LEVEL_ENDS))
        ]
        self.grad_checkpointing = False
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.reset_classifier(num_classes)
        self.stage_gates = nn.ModuleDict({s: nn.Identity() for s in STAGES})
        self.stage_gates.update(
            stage_end_gates(
                widths[1:],
                gate_stages,
                offset_groups,
                reduction=reduction,
                dw_kernel_size=dw_kernel_size,
                deform_kernel_size=deform_kernel_size,
                modulated=modulated,
                norm=norm,
                act=act,
                gate_mode=gate_mode,
            )
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the inverted-residual blocks in the backward pass instead of storing their activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier[1]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh ``num_classes`` classifier (0: none, the model returns pooled features)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.classifier[1] = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def fresh_modules(self) -> list[str]:
        """The DAS gates: a torchvision MobileNetV2 checkpoint has no weights for them."""
        return gate_names(self)

    def _level(self, level: int, x: Tensor) -> Tensor:
        """Feature level ``level`` (0: stride 2, 1-4: stages) from the previous one, after its gate."""
        start = 0 if level == 0 else LEVEL_ENDS[level - 1] + 1
        blocks = self.features[start : LEVEL_ENDS[level] + 1]
        x = checkpoint_seq(blocks, x) if self.grad_checkpointing and not torch.jit.is_scripting() else blocks(x)
        return x if level == 0 else self.stage_gates[str(level)](x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage map (stride 32, 1280 channels at width 1), after every gate."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._forward_levels(x)
        for index, block in enumerate(self.features):  # no slicing: TorchScript and FX see the registered blocks
            x = block(x)
            if index == 3:
                x = self.stage_gates["1"](x)
            elif index == 6:
                x = self.stage_gates["2"](x)
            elif index == 13:
                x = self.stage_gates["3"](x)
            elif index == 18:
                x = self.stage_gates["4"](x)
        return x

    def _prune_levels_after(self, level: int) -> None:
        for index in range(LEVEL_ENDS[level] + 1, len(self.features)):
            self.features[index] = nn.Identity()
        for stage in range(level + 1, 5):
            self.stage_gates[str(stage)] = nn.Identity()

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooling, dropout and classifier (pooled features with ``pre_logits`` or num_classes=0)."""
        x = self.global_pool(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state: StateDict, model: DASMobileNetV2) -> StateDict:
    """A torchvision MobileNetV2 (or das-lab) state_dict for ``model``: same keys; DAS gates start fresh."""
    return fill_fresh(state, model)


default_cfgs = generate_default_cfgs(
    {
        "das_mobilenet_v2.tv_in1k": dict(
            url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
            num_classes=1000,
            input_size=(3, 224, 224),
            pool_size=(7, 7),
            crop_pct=0.875,
            interpolation="bilinear",
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            first_conv="features.0.0",
            classifier="classifier.1",
            license="bsd-3-clause",
            paper_ids="arXiv:2311.12091",
            notes=("torchvision ImageNet-1k weights of the plain MobileNetV2; DAS gates start fresh",),
        ),
    }
)


@register_model
def das_mobilenet_v2(pretrained: bool = False, **kwargs: Any) -> DASMobileNetV2:
    """DAS-MobileNetV2 (gates after stages 2 and 3) with the arguments of conf/model/das_mobilenet_v2.yaml."""
    return create_variant(
        DASMobileNetV2,
        "das_mobilenet_v2",
        "das_mobilenet_v2",
        pretrained,
        kwargs,
        checkpoint_filter_fn,
        lambda m: (0, 1, 2, 3, 4),
    )
