"""MobileNetV2 with DAS gates after chosen inverted-residual stages (torchvision key names).

torchvision's MobileNetV2 (keys ``features.<i>.*``, ``classifier.1.*``) so its ImageNet
checkpoints load; gates live under ``stage_gates.<s>.*`` and start fresh. The four stages of the
backbone contract end at ``features`` indices 3, 6, 13 and 18 (strides 4, 8, 16, 32; 24, 32, 96 and
1280 channels at ``width_mult=1``). Default ``das_mobilenet_v2``: gates after stages 2 and 3
(``reduction=0.25``: 8 and 24 hidden channels), cheap next to the network's 0.30 GFLOPs.
Gate arguments are those of :class:`das_lab.models.das.DASGate`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from timm.models import register_model
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import MobileNetV2

from das_lab.models.das import OffsetGroups, gate_names, stage_end_gates
from das_lab.models.weights import entrypoint_kwargs, load_weights

STAGE_ENDS = (3, 6, 13, 18)  # last ``features`` index of each stage
STAGE_STRIDES = (4, 8, 16, 32)


class DASMobileNetV2(MobileNetV2):
    """MobileNetV2 following the backbone contract, with DAS gates on chosen stage outputs."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        gate_stages: Sequence[int] = (2, 3),
        reduction: float = 0.25,
        dw_kernel_size: int = 3,
        offset_groups: OffsetGroups = 1,
        deform_kernel_size: int = 3,
        modulated: bool = False,
        norm: str = "layer",
        act: str = "gelu",
        gate_mode: str = "multiply",
        checkpoint: Optional[str] = None,
        checkpoint_strict: bool = True,
    ) -> None:
        super().__init__(num_classes=max(num_classes, 1), width_mult=width_mult, dropout=dropout)
        self.num_classes = num_classes
        if num_classes == 0:
            self.classifier = nn.Identity()
        self.stage_channels = tuple(self.features[i].out_channels for i in STAGE_ENDS)
        self.stage_strides = STAGE_STRIDES
        self.stage_gates = stage_end_gates(
            self.stage_channels,
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
        if checkpoint:
            load_weights(self, checkpoint, strict=checkpoint_strict, new_modules=gate_names(self))

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """One feature map per stage (strides 4, 8, 16, 32), after that stage's gate if any."""
        features = []
        start = 0
        for stage, end in enumerate(STAGE_ENDS, start=1):
            x = self.features[start : end + 1](x)
            if str(stage) in self.stage_gates:
                x = self.stage_gates[str(stage)](x)
            features.append(x)
            start = end + 1
        return features

    def forward_head(self, features: list[Tensor]) -> Tensor:
        """Logits (pooled features when num_classes=0) from the last stage map."""
        return self.classifier(nn.functional.adaptive_avg_pool2d(features[-1], 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.forward_head(self.forward_features(x))


@register_model
def das_mobilenet_v2(pretrained: bool = False, **kwargs: Any) -> DASMobileNetV2:
    """DAS-MobileNetV2 (gates after stages 2 and 3); weights come from ``checkpoint=``, not downloads."""
    return DASMobileNetV2(**entrypoint_kwargs("das_mobilenet_v2", pretrained, kwargs))
