"""DAT++ (Deformable Attention Transformer, Xia et al. 2023), the same network as the official code.

Module names, parameter shapes and the forward computation follow LeapLabTHU/DAT
(``models/dat.py``, ``models/dat_blocks.py``) so that its ImageNet checkpoints load with
``strict=True`` through the ``checkpoint`` argument. Stages are sequences of blocks given by
``stage_spec``: ``"N"`` neighborhood attention, ``"D"`` deformable multi-head attention. Each
block is LPU (depthwise 3x3 residual) -> LN -> attention -> LN -> MLP, both with drop path.

Sizes: the relative-position tables of deformable blocks (``rpe_table``, heads x (2H-1) x
(2W-1)) are sized for ``img_size`` but sampled in normalised coordinates, so any input whose
sides are multiples of 32 runs; a checkpoint saved for another ``img_size`` has its tables
resized bicubically on load, as the official ``load_pretrained`` does. Reference grids follow
the actual feature map. Axes of a single position (tiny inputs) get the normalised coordinate
0, where the official code divides by zero.

Visualisation: ``forward_features(x, return_sampling=True)`` also returns, for each deformable
block, its sampling positions and reference points (normalised (y, x) in [-1, 1], corners
aligned with the stage's feature map).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from das_lab.models.neighborhood_attention import NeighborhoodAttention2D
from das_lab.models.weights import read_state_dict

log = logging.getLogger(__name__)

BLOCK_TYPES = ("N", "D")


class DeformableSampling(NamedTuple):
    """Where one deformable block sampled its keys: (B, groups, Hk, Wk, 2) tensors in (y, x) order."""

    stage: int
    block: int
    pos: Tensor
    reference: Tensor


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels of a (B, C, H, W) map; holds ``norm`` like the official LayerNormProxy."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """Per-channel residual scaling (used when ``layer_scale_values`` > 0)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(-1, 1, 1)


class ConvMLP(nn.Module):
    """DWC-MLP of DAT++: 1x1 expand, depthwise 3x3 residual, GELU, 1x1 reduce."""

    def __init__(self, dim: int, expansion: int, drop: float) -> None:
        super().__init__()
        hidden = dim * expansion
        self.linear1 = nn.Sequential(nn.Conv2d(dim, hidden, 1))
        self.drop1 = nn.Dropout(drop)
        self.act = nn.GELU()
        self.linear2 = nn.Sequential(nn.Conv2d(hidden, dim, 1))
        self.drop2 = nn.Dropout(drop)
        self.dwc = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.linear1(x))
        x = self.act(x + self.dwc(x))
        return self.drop2(self.linear2(x))


class TokenMLP(nn.Module):
    """Plain transformer MLP (``use_dwc_mlps`` false), as in the original DAT."""

    def __init__(self, dim: int, expansion: int, drop: float) -> None:
        super().__init__()
        self.chunk = nn.Sequential()
        self.chunk.add_module("linear1", nn.Linear(dim, dim * expansion))
        self.chunk.add_module("act", nn.GELU())
        self.chunk.add_module("drop1", nn.Dropout(drop))
        self.chunk.add_module("linear2", nn.Linear(dim * expansion, dim))
        self.chunk.add_module("drop2", nn.Dropout(drop))

    def forward(self, x: Tensor) -> Tensor:
        return self.chunk(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _normalize(coords: Tensor, size: int) -> Tensor:
    """Pixel coordinates -> [-1, 1] with corners aligned (official scaling); a single position maps to 0."""
    if size == 1:
        return torch.zeros_like(coords)
    return coords / (size - 1.0) * 2.0 - 1.0


def _grid(ys: Tensor, xs: Tensor, height: int, width: int, batch: int) -> Tensor:
    """(batch, H, W, 2) grid of normalised (y, x) coordinates."""
    grid_y, grid_x = torch.meshgrid(_normalize(ys, height), _normalize(xs, width), indexing="ij")
    return torch.stack((grid_y, grid_x), -1)[None].expand(batch, -1, -1, -1)


class DeformableAttention(nn.Module):
    """Deformable multi-head attention ('D' block): keys/values sampled at learned offsets of a reference grid."""

    def __init__(
        self, fmap_size: tuple[int, int], n_heads: int, n_head_channels: int, n_groups: int, attn_drop: float,
        proj_drop: float, stride: int, offset_range_factor: float, use_pe: bool, dwc_pe: bool, no_off: bool,
        fixed_pe: bool, ksize: int, log_cpb: bool,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_head_channels, self.n_groups = n_heads, n_head_channels, n_groups
        self.nc = n_heads * n_head_channels
        if n_heads % n_groups:
            raise ValueError(
                f"groups={n_groups} does not divide heads={n_heads}; choose offset groups that divide the stage's heads"
            )
        self.n_group_channels = self.nc // n_groups
        self.n_group_heads = n_heads // n_groups
        self.scale = n_head_channels ** -0.5
        self.q_h, self.q_w = fmap_size
        self.kv_h, self.kv_w = self.q_h // stride, self.q_w // stride
        self.stride, self.ksize = stride, ksize
        self.offset_range_factor = offset_range_factor
        self.use_pe, self.dwc_pe, self.fixed_pe, self.log_cpb, self.no_off = use_pe, dwc_pe, fixed_pe, log_cpb, no_off

        gc = self.n_group_channels
        self.conv_offset = nn.Sequential(
            nn.Conv2d(gc, gc, ksize, stride, ksize // 2 if ksize != stride else 0, groups=gc),
            ChannelLayerNorm(gc),
            nn.GELU(),
            nn.Conv2d(gc, 2, 1, 1, 0, bias=False),
        )
        if no_off:
            self.conv_offset.requires_grad_(False)
        self.proj_q = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_k = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_v = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_out = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_drop = nn.Dropout(attn_drop)
        self.rpe_table = self._make_position_table() if use_pe and not no_off else None

    def _make_position_table(self) -> nn.Module | nn.Parameter:
        """The position-encoding parameters of the selected variant (dwc_pe > fixed_pe > log_cpb > table)."""
        if self.dwc_pe:
            return nn.Conv2d(self.nc, self.nc, 3, 1, 1, groups=self.nc)
        if self.log_cpb:
            return nn.Sequential(nn.Linear(2, 32), nn.ReLU(inplace=True), nn.Linear(32, self.n_group_heads, bias=False))
        shape = (
            (self.n_heads, self.q_h * self.q_w, self.kv_h * self.kv_w) if self.fixed_pe
            else (self.n_heads, 2 * self.q_h - 1, 2 * self.q_w - 1)
        )
        table = nn.Parameter(torch.zeros(shape))
        nn.init.trunc_normal_(table, std=0.01)
        return table

    def _sample_positions(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Sampling positions and reference points, (B*groups, Hk, Wk, 2) normalised (y, x)."""
        batch = q.shape[0]
        offset = self.conv_offset(q.reshape(batch * self.n_groups, self.n_group_channels, *q.shape[2:]))
        hk, wk = offset.shape[2:]
        dtype, device = q.dtype, q.device
        reference = _grid(
            torch.arange(0.5, hk, dtype=dtype, device=device), torch.arange(0.5, wk, dtype=dtype, device=device),
            hk, wk, batch * self.n_groups,
        )
        if self.no_off:
            return reference, reference
        if self.offset_range_factor >= 0:
            offset_range = torch.tensor([1.0 / max(hk - 1.0, 1.0), 1.0 / max(wk - 1.0, 1.0)], dtype=dtype, device=device)
            offset = offset.tanh() * offset_range.view(1, 2, 1, 1) * self.offset_range_factor
            return offset.permute(0, 2, 3, 1) + reference, reference
        return (offset.permute(0, 2, 3, 1) + reference).clamp(-1.0, 1.0), reference

    def _sample_keys(self, x: Tensor, pos: Tensor) -> Tensor:
        """Features at the sampling positions, (B*groups, C/groups, Hk, Wk)."""
        batch, _, height, width = x.shape
        hk, wk = pos.shape[1:3]
        if self.no_off:
            pooled = F.avg_pool2d(x, self.stride, self.stride)
            return pooled if pooled.shape[2:] == (hk, wk) else F.adaptive_avg_pool2d(x, (hk, wk))
        grouped = x.reshape(batch * self.n_groups, self.n_group_channels, height, width)
        return F.grid_sample(grouped, pos.flip(-1), mode="bilinear", align_corners=True)

    def _position_bias(self, height: int, width: int, pos: Tensor, dtype: torch.dtype) -> Tensor:
        """Attention bias (B*heads, H*W, Ns) from the table at the continuous query-to-key displacements."""
        bg, hk, wk, _ = pos.shape
        n_sample = hk * wk
        batch = bg // self.n_groups
        if self.fixed_pe:
            if self.rpe_table.shape[1:] != (height * width, n_sample):
                raise ValueError(
                    f"fixed_pes table was built for a {self.q_h}x{self.q_w} map (model.img_size) but the map is "
                    f"{height}x{width}; feed img_size inputs or set model.fixed_pes false for this stage"
                )
            return self.rpe_table[None].expand(batch, -1, -1, -1).reshape(batch * self.n_heads, height * width, n_sample)
        q_grid = _grid(
            torch.arange(height, dtype=dtype, device=pos.device), torch.arange(width, dtype=dtype, device=pos.device),
            height, width, bg,
        )
        displacement = q_grid.reshape(bg, height * width, 1, 2) - pos.reshape(bg, 1, n_sample, 2)
        if self.log_cpb:
            displacement = displacement * 4.0
            displacement = torch.sign(displacement) * torch.log2(displacement.abs() + 1.0) / math.log2(8.0)
            bias = self.rpe_table(displacement)
            return bias.permute(0, 3, 1, 2).reshape(batch * self.n_heads, height * width, n_sample)
        table = self.rpe_table[None].expand(batch, -1, -1, -1).reshape(bg, self.n_group_heads, *self.rpe_table.shape[1:])
        bias = F.grid_sample(table, (displacement * 0.5).flip(-1), mode="bilinear", align_corners=True)
        return bias.reshape(batch * self.n_heads, height * width, n_sample)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> output (B, C, H, W), sampling positions and reference points (B, groups, Hk, Wk, 2)."""
        batch, channels, height, width = x.shape
        q = self.proj_q(x)
        pos, reference = self._sample_positions(q)
        hk, wk = pos.shape[1:3]
        n_sample = hk * wk
        sampled = self._sample_keys(x, pos).reshape(batch, channels, 1, n_sample)
        q_heads = q.reshape(batch * self.n_heads, self.n_head_channels, height * width)
        k = self.proj_k(sampled).reshape(batch * self.n_heads, self.n_head_channels, n_sample)
        v = self.proj_v(sampled).reshape(batch * self.n_heads, self.n_head_channels, n_sample)
        attn = torch.einsum("bcm,bcn->bmn", q_heads, k) * self.scale
        use_table = self.rpe_table is not None and not self.dwc_pe
        if use_table:
            attn = attn + self._position_bias(height, width, pos, x.dtype)
        attn = self.attn_drop(attn.softmax(dim=2))
        out = torch.einsum("bmn,bcn->bcm", attn, v)
        if self.rpe_table is not None and self.dwc_pe:
            out = out + self.rpe_table(q).reshape(batch * self.n_heads, self.n_head_channels, height * width)
        y = self.proj_drop(self.proj_out(out.reshape(batch, channels, height, width)))
        shape = (batch, self.n_groups, hk, wk, 2)
        return y, pos.reshape(shape), reference.reshape(shape)


class DATStage(nn.Module):
    """One resolution of DAT++: a sequence of N/D blocks; attribute names are the official TransformerStage's."""

    def __init__(
        self, fmap_size: tuple[int, int], dim_in: int, dim: int, stage_spec: Sequence[str], heads: int, groups: int,
        stride: int, offset_range_factor: float, use_pe: bool, dwc_pe: bool, no_off: bool, fixed_pe: bool,
        log_cpb: bool, ksize: int, nat_ksize: int, use_dwc_mlp: bool, use_lpu: bool, layer_scale_value: float,
        expansion: int, drop: float, attn_drop: float, drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        depth = len(stage_spec)
        self.stage_spec = list(stage_spec)
        self.use_lpu = use_lpu
        self.proj = nn.Conv2d(dim_in, dim, 1) if dim_in != dim else nn.Identity()
        self.layer_norms = nn.ModuleList(ChannelLayerNorm(dim) for _ in range(2 * depth))
        mlp = ConvMLP if use_dwc_mlp else TokenMLP
        self.mlps = nn.ModuleList(mlp(dim, expansion, drop) for _ in range(depth))
        self.layer_scales = nn.ModuleList(
            LayerScale(dim, layer_scale_value) if layer_scale_value > 0 else nn.Identity() for _ in range(2 * depth)
        )
        self.local_perception_units = nn.ModuleList(
            nn.Conv2d(dim, dim, 3, 1, 1, groups=dim) if use_lpu else nn.Identity() for _ in range(depth)
        )
        self.attns = nn.ModuleList()
        for kind in self.stage_spec:
            if kind == "N":
                self.attns.append(NeighborhoodAttention2D(dim, nat_ksize, heads, attn_drop, drop))
            else:
                self.attns.append(DeformableAttention(
                    fmap_size, heads, dim // heads, groups, attn_drop, drop, stride, offset_range_factor,
                    use_pe, dwc_pe, no_off, fixed_pe, ksize, log_cpb,
                ))
        self.drop_path = nn.ModuleList(DropPath(p) if p > 0 else nn.Identity() for p in drop_path)

    def forward(self, x: Tensor) -> tuple[Tensor, list[tuple[int, Tensor, Tensor]]]:
        """Map after all blocks, and (block index, positions, references) of each deformable block."""
        x = self.proj(x)
        samples = []
        for d, kind in enumerate(self.stage_spec):
            if self.use_lpu:
                x = x + self.local_perception_units[d](x.contiguous())
            out = self.attns[d](self.layer_norms[2 * d](x))
            if kind == "D":
                out, pos, ref = out
                samples.append((d, pos, ref))
            x = x + self.drop_path[d](self.layer_scales[2 * d](out))
            out = self.mlps[d](self.layer_norms[2 * d + 1](x))
            x = x + self.drop_path[d](self.layer_scales[2 * d + 1](out))
        return x, samples


def _per_stage(name: str, values: Sequence[Any]) -> list[Any]:
    """Check a per-stage list has four entries and return it as a plain list."""
    values = list(values)
    if len(values) != 4:
        raise ValueError(f"model.{name} has {len(values)} entries; DAT++ needs one per stage (4), e.g. {name}=[a,b,c,d]")
    return values


class DAT(nn.Module):
    """DAT++ backbone + classifier; arguments and defaults are the official DAT-T++ configuration."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        num_classes: int = 1000,
        expansion: int = 4,
        dim_stem: int = 64,
        dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 4, 18, 2),
        heads: Sequence[int] = (2, 4, 8, 16),
        stage_spec: Sequence[Sequence[str]] = (("N", "D"), ("N", "D") * 2, ("N", "D") * 9, ("D", "D")),
        groups: Sequence[int] = (1, 2, 4, 8),
        strides: Sequence[int] = (8, 4, 2, 1),
        offset_range_factor: Sequence[float] = (-1, -1, -1, -1),
        use_pes: Sequence[bool] = (True, True, True, True),
        dwc_pes: Sequence[bool] = (False, False, False, False),
        fixed_pes: Sequence[bool] = (False, False, False, False),
        no_offs: Sequence[bool] = (False, False, False, False),
        log_cpb: Sequence[bool] = (False, False, False, False),
        ksizes: Sequence[int] = (9, 7, 5, 3),
        nat_ksizes: Sequence[int] = (7, 7, 7, 7),
        use_dwc_mlps: Sequence[bool] = (True, True, True, True),
        use_lpus: Sequence[bool] = (True, True, True, True),
        layer_scale_values: Sequence[float] = (-1, -1, -1, -1),
        use_conv_patches: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        dims, depths, heads = _per_stage("dims", dims), _per_stage("depths", depths), _per_stage("heads", heads)
        stage_spec = [[str(kind) for kind in spec] for spec in _per_stage("stage_spec", stage_spec)]
        per_stage = {
            name: _per_stage(name, value) for name, value in dict(
                groups=groups, strides=strides, offset_range_factor=offset_range_factor, use_pes=use_pes,
                dwc_pes=dwc_pes, fixed_pes=fixed_pes, no_offs=no_offs, log_cpb=log_cpb, ksizes=ksizes,
                nat_ksizes=nat_ksizes, use_dwc_mlps=use_dwc_mlps, use_lpus=use_lpus,
                layer_scale_values=layer_scale_values,
            ).items()
        }
        for i, spec in enumerate(stage_spec):
            if len(spec) != depths[i]:
                raise ValueError(f"model.stage_spec[{i}] has {len(spec)} blocks but model.depths[{i}]={depths[i]}; make them equal")
            bad = sorted(set(spec) - set(BLOCK_TYPES))
            if bad:
                raise ValueError(f"model.stage_spec[{i}] has unknown block types {bad}; DAT++ blocks are {list(BLOCK_TYPES)}")
            if dims[i] % heads[i]:
                raise ValueError(f"model.heads[{i}]={heads[i]} does not divide model.dims[{i}]={dims[i]}; choose a divisor")
        if img_size % (patch_size * 8):
            raise ValueError(f"model.img_size={img_size} must be a multiple of {patch_size * 8} (patch_size x 8)")

        self.num_classes = num_classes
        self.stage_channels = tuple(dims)
        self.stage_strides = tuple(patch_size * 2 ** i for i in range(4))
        if use_conv_patches:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(3, dim_stem // 2, 3, patch_size // 2, 1), ChannelLayerNorm(dim_stem // 2), nn.GELU(),
                nn.Conv2d(dim_stem // 2, dim_stem, 3, patch_size // 2, 1), ChannelLayerNorm(dim_stem),
            )
        else:
            self.patch_proj = nn.Sequential(nn.Conv2d(3, dim_stem, patch_size, patch_size), ChannelLayerNorm(dim_stem))

        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        fmap = img_size // patch_size
        for i in range(4):
            s = {name: value[i] for name, value in per_stage.items()}
            self.stages.append(DATStage(
                (fmap, fmap), dim_stem if i == 0 else dims[i], dims[i], stage_spec[i], heads[i], s["groups"],
                s["strides"], s["offset_range_factor"], s["use_pes"], s["dwc_pes"], s["no_offs"], s["fixed_pes"],
                s["log_cpb"], s["ksizes"], s["nat_ksizes"], s["use_dwc_mlps"], s["use_lpus"], s["layer_scale_values"],
                expansion, drop_rate, attn_drop_rate, drop_path[sum(depths[:i]):sum(depths[:i + 1])],
            ))
            fmap //= 2
        kernel, padding = (3, 1) if use_conv_patches else (2, 0)
        self.down_projs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], kernel, 2, padding, bias=False), ChannelLayerNorm(dims[i + 1]))
            for i in range(3)
        )
        self.cls_norm = ChannelLayerNorm(dims[-1])
        self.cls_head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        if checkpoint is not None:
            load_checkpoint(self, checkpoint)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position tables are exempt from weight decay, as in the official recipe (timm reads this)."""
        return {name for name, _ in self.named_parameters() if "rpe_table" in name}

    def forward_features(
        self, x: Tensor, return_sampling: bool = False,
    ) -> list[Tensor] | tuple[list[Tensor], list[DeformableSampling]]:
        """Four stage maps (B, C_i, H_i, W_i); with ``return_sampling`` also each deformable block's sampling."""
        x = self.patch_proj(x)
        features, sampling = [], []
        for i, stage in enumerate(self.stages):
            x, samples = stage(x)
            features.append(x)
            sampling.extend(DeformableSampling(i, block, pos, ref) for block, pos, ref in samples)
            if i < 3:
                x = self.down_projs[i](x)
        return (features, sampling) if return_sampling else features

    def forward_head(self, features: list[Tensor]) -> Tensor:
        """Logits (or pooled features when num_classes=0) from the last stage map."""
        x = self.cls_norm(features[-1])
        return self.cls_head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def adapt_state_dict(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Fit a DAT++ state_dict to ``model``: resize position tables bicubically, drop a head of another size."""
    own = model.state_dict()
    adapted = {}
    for key, value in state_dict.items():
        target = own.get(key)
        if target is None or target.shape == value.shape:
            adapted[key] = value
        elif key.endswith("rpe_table") and value.dim() == 3:
            adapted[key] = F.interpolate(value[None].float(), size=target.shape[1:], mode="bicubic")[0].to(value.dtype)
        elif key.startswith("cls_head."):
            log.warning("checkpoint head %s has shape %s, model needs %s: keeping a fresh head",
                        key, tuple(value.shape), tuple(target.shape))
        else:
            raise ValueError(
                f"checkpoint entry {key} has shape {tuple(value.shape)} but the model expects {tuple(target.shape)}; "
                f"build the model with the checkpoint's architecture (model.dims/heads/groups/...)"
            )
    return adapted


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load an official DAT++ ``.pth`` (its ``model`` entry), a state_dict or a das-lab ``.ckpt`` strictly."""
    state = read_state_dict(path)
    adapted = adapt_state_dict(state, model)
    missing, unexpected = model.load_state_dict(adapted, strict=False)
    dropped_head = {key for key in state if key.startswith("cls_head.") and key not in adapted}
    missing = [key for key in missing if key not in dropped_head]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this DAT++ model: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)}); "
            f"use the model config of the checkpoint's variant (dat_tiny/dat_small/dat_base)"
        )


_STAGE_SPEC = [["N", "D"], ["N", "D"] * 2, ["N", "D"] * 9, ["D", "D"]]
_DAT_PP_COMMON: dict[str, Any] = dict(
    depths=[2, 4, 18, 2], stage_spec=_STAGE_SPEC, strides=[8, 4, 2, 1], offset_range_factor=[-1, -1, -1, -1],
    use_pes=[True] * 4, dwc_pes=[False] * 4, fixed_pes=[False] * 4, no_offs=[False] * 4, log_cpb=[False] * 4,
    ksizes=[9, 7, 5, 3], nat_ksizes=[7, 7, 7, 7], use_dwc_mlps=[True] * 4, use_lpus=[True] * 4,
    layer_scale_values=[-1, -1, -1, -1], use_conv_patches=True, expansion=4, patch_size=4, img_size=224,
)
VARIANTS: dict[str, dict[str, Any]] = {
    "dat_tiny": dict(_DAT_PP_COMMON, dim_stem=64, dims=[64, 128, 256, 512], heads=[2, 4, 8, 16], groups=[1, 2, 4, 8],
                     drop_path_rate=0.2),
    "dat_small": dict(_DAT_PP_COMMON, dim_stem=96, dims=[96, 192, 384, 768], heads=[3, 6, 12, 24], groups=[1, 2, 3, 6],
                      drop_path_rate=0.4),
    "dat_base": dict(_DAT_PP_COMMON, dim_stem=128, dims=[128, 256, 512, 1024], heads=[4, 8, 16, 32],
                     groups=[2, 4, 8, 16], drop_path_rate=0.7),
    "dat_nano": dict(_DAT_PP_COMMON, img_size=64, dim_stem=16, dims=[16, 32, 64, 128], depths=[2, 2, 2, 1],
                     heads=[1, 2, 2, 4], groups=[1, 1, 1, 2], strides=[4, 2, 1, 1],
                     stage_spec=[["N", "D"], ["N", "D"], ["N", "D"], ["D"]], drop_path_rate=0.1),
}


def _create(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> DAT:
    """Build a named variant; timm's pretrained/cfg arguments are accepted, weights come from ``checkpoint``."""
    if pretrained:
        raise ValueError(f"{variant}: das-lab downloads no weights; pass checkpoint=/path/to/official.pth instead")
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)
    return DAT(**{**VARIANTS[variant], **kwargs})


@timm.models.register_model
def dat_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-T++ (24M params, 4.3 GFLOPs at 224)."""
    return _create("dat_tiny", pretrained, kwargs)


@timm.models.register_model
def dat_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-S++ (53M params, 9.4 GFLOPs at 224)."""
    return _create("dat_small", pretrained, kwargs)


@timm.models.register_model
def dat_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-B++ (94M params, 16.6 GFLOPs at 224; use img_size=384 for the 384 fine-tuned model)."""
    return _create("dat_base", pretrained, kwargs)


@timm.models.register_model
def dat_nano(pretrained: bool = False, **kwargs: Any) -> DAT:
    """A small DAT++ that trains on 64x64 images on a CPU in minutes."""
    return _create("dat_nano", pretrained, kwargs)
