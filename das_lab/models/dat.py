"""DAT++ (Deformable Attention Transformer, Xia et al. 2023), the same network as the official code.

Module names, parameter shapes and the forward computation follow LeapLabTHU/DAT
(``models/dat.py``, ``models/dat_blocks.py``) so that its ImageNet checkpoints load with
``strict=True`` (``model.checkpoint=<file>``, or ``pretrained=True`` through timm). Stages are sequences of blocks given by
``stage_spec``: ``"N"`` neighborhood attention, ``"D"`` deformable multi-head attention. Each
block is LPU (depthwise 3x3 residual) -> LN -> attention -> LN -> MLP, both with drop path.

Sizes: the relative-position tables of deformable blocks (``rpe_table``, heads x (2H-1) x
(2W-1)) are sized for ``img_size`` but sampled in normalised coordinates, so any input whose
sides are multiples of 32 runs; a checkpoint saved for another ``img_size`` has its tables
resized bicubically on load, as the official ``load_pretrained`` does. Reference grids follow
the actual feature map. Axes of a single position (tiny inputs) get the normalised coordinate
0, where the official code divides by zero.

timm contract: ``forward_features`` returns the last stage map, ``forward_head`` applies the
classification norm, pooling and head, ``forward_intermediates``/``features_only`` return the
four stage maps (through ``norms.<i>`` when built with ``out_norms=True``, as the official
detection backbone), ``set_grad_checkpointing`` checkpoints every block.

Visualisation: ``forward_sampling(x)`` returns the stage maps and, for each deformable block, its
sampling positions and reference points (normalised (y, x) in [-1, 1], corners aligned with the
stage's feature map).
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, SelectAdaptivePool2d
from timm.models import generate_default_cfgs, register_model, register_notrace_module
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from das_lab.models.attention_impl import check_attn_impl, use_fused
from das_lab.models.builder import FeatureLevels, create_variant
from das_lab.models.neighborhood_attention import NeighborhoodAttention2D
from das_lab.models.weights import fill_fresh, unwrap_state_dict

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


@register_notrace_module  # one FX leaf: sampling grids depend on the map size
class DeformableAttention(nn.Module):
    """Deformable multi-head attention ('D' block): keys/values sampled at learned offsets of a reference grid."""

    def __init__(
        self,
        fmap_size: tuple[int, int],
        n_heads: int,
        n_head_channels: int,
        n_groups: int,
        attn_drop: float,
        proj_drop: float,
        stride: int,
        offset_range_factor: float,
        use_pe: bool,
        dwc_pe: bool,
        no_off: bool,
        fixed_pe: bool,
        ksize: int,
        log_cpb: bool,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.attn_impl = check_attn_impl(attn_impl)
        self.n_heads, self.n_head_channels, self.n_groups = n_heads, n_head_channels, n_groups
        self.nc = n_heads * n_head_channels
        if n_heads % n_groups:
            raise ValueError(
                f"groups={n_groups} does not divide heads={n_heads}; choose offset groups that divide the stage's heads"
            )
        self.n_group_channels = self.nc // n_groups
        self.n_group_heads = n_heads // n_groups
        self.scale = n_head_channels**-0.5
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
            (self.n_heads, self.q_h * self.q_w, self.kv_h * self.kv_w)
            if self.fixed_pe
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
            torch.arange(0.5, hk, dtype=dtype, device=device),
            torch.arange(0.5, wk, dtype=dtype, device=device),
            hk,
            wk,
            batch * self.n_groups,
        )
        if self.no_off:
            return reference, reference
        if self.offset_range_factor >= 0:
            offset_range = torch.tensor(
                [1.0 / max(hk - 1.0, 1.0), 1.0 / max(wk - 1.0, 1.0)], dtype=dtype, device=device
            )
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
            return (
                self.rpe_table[None].expand(batch, -1, -1, -1).reshape(batch * self.n_heads, height * width, n_sample)
            )
        q_grid = _grid(
            torch.arange(height, dtype=dtype, device=pos.device),
            torch.arange(width, dtype=dtype, device=pos.device),
            height,
            width,
            bg,
        )
        displacement = q_grid.reshape(bg, height * width, 1, 2) - pos.reshape(bg, 1, n_sample, 2)
        if self.log_cpb:
            displacement = displacement * 4.0
            displacement = torch.sign(displacement) * torch.log2(displacement.abs() + 1.0) / math.log2(8.0)
            bias = self.rpe_table(displacement)
            return bias.permute(0, 3, 1, 2).reshape(batch * self.n_heads, height * width, n_sample)
        table = (
            self.rpe_table[None].expand(batch, -1, -1, -1).reshape(bg, self.n_group_heads, *self.rpe_table.shape[1:])
        )
        bias = F.grid_sample(table, (displacement * 0.5).flip(-1), mode="bilinear", align_corners=True)
        return bias.reshape(batch * self.n_heads, height * width, n_sample)

    def _attend_reference(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """Softmax attention (B*heads, C/heads, HW) of q (B*heads, C/heads, HW) over k, v (B*heads, C/heads, Ns), as the official code."""
        attn = torch.einsum("bcm,bcn->bmn", q, k) * self.scale
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=2))
        return torch.einsum("bmn,bcn->bcm", attn, v)

    def _attend_fused(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """:meth:`_attend_reference` by ``scaled_dot_product_attention``, the bias as its additive float mask."""
        heads, channels = self.n_heads, self.n_head_channels
        batch = q.shape[0] // heads
        q, k, v = (t.view(batch, heads, channels, -1).transpose(2, 3) for t in (q, k, v))
        mask = (
            None if bias is None else bias.view(batch, heads, *bias.shape[1:]).to(q.dtype)
        )  # SDPA: mask dtype = query's
        dropout = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        return out.transpose(2, 3).reshape(batch * heads, channels, -1)

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
        use_table = self.rpe_table is not None and not self.dwc_pe
        bias = self._position_bias(height, width, pos, x.dtype) if use_table else None
        if use_fused(self.attn_impl, x.device, dropout_active=False):
            out = self._attend_fused(q_heads, k, v, bias)
        else:
            out = self._attend_reference(q_heads, k, v, bias)
        if self.rpe_table is not None and self.dwc_pe:
            out = out + self.rpe_table(q).reshape(batch * self.n_heads, self.n_head_channels, height * width)
        y = self.proj_drop(self.proj_out(out.reshape(batch, channels, height, width)))
        shape = (batch, self.n_groups, hk, wk, 2)
        return y, pos.reshape(shape), reference.reshape(shape)


class DATStage(nn.Module):
    """One resolution of DAT++: a sequence of N/D blocks; attribute names are the official TransformerStage's."""

    def __init__(
        self,
        fmap_size: tuple[int, int],
        dim_in: int,
        dim: int,
        stage_spec: Sequence[str],
        heads: int,
        groups: int,
        stride: int,
        offset_range_factor: float,
        use_pe: bool,
        dwc_pe: bool,
        no_off: bool,
        fixed_pe: bool,
        log_cpb: bool,
        ksize: int,
        nat_ksize: int,
        use_dwc_mlp: bool,
        use_lpu: bool,
        layer_scale_value: float,
        expansion: int,
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        attn_impl: str,
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
                self.attns.append(NeighborhoodAttention2D(dim, nat_ksize, heads, attn_drop, drop, attn_impl))
            else:
                self.attns.append(
                    DeformableAttention(
                        fmap_size,
                        heads,
                        dim // heads,
                        groups,
                        attn_drop,
                        drop,
                        stride,
                        offset_range_factor,
                        use_pe,
                        dwc_pe,
                        no_off,
                        fixed_pe,
                        ksize,
                        log_cpb,
                        attn_impl,
                    )
                )
        self.drop_path = nn.ModuleList(DropPath(p) if p > 0 else nn.Identity() for p in drop_path)

        self.grad_checkpointing = False

    def _block(self, d: int, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Block ``d``: LPU, attention, MLP; with a deformable block's sampling positions and references."""
        if self.use_lpu:
            x = x + self.local_perception_units[d](x.contiguous())
        out = self.attns[d](self.layer_norms[2 * d](x))
        pos = ref = None
        if self.stage_spec[d] == "D":
            out, pos, ref = out
        x = x + self.drop_path[d](self.layer_scales[2 * d](out))
        out = self.mlps[d](self.layer_norms[2 * d + 1](x))
        return x + self.drop_path[d](self.layer_scales[2 * d + 1](out)), pos, ref

    def forward(self, x: Tensor) -> tuple[Tensor, list[tuple[int, Tensor, Tensor]]]:
        """Map after all blocks, and (block index, positions, references) of each deformable block.

        With ``grad_checkpointing`` each block is recomputed in the backward pass instead of
        keeping its activations (``torch.utils.checkpoint``, non-reentrant).
        """
        x = self.proj(x)
        samples = []
        for d in range(len(self.stage_spec)):
            if self.grad_checkpointing and x.requires_grad:
                x, pos, ref = checkpoint(self._block, d, x, use_reentrant=False)
            else:
                x, pos, ref = self._block(d, x)
            if pos is not None:
                samples.append((d, pos, ref))
        return x, samples


def _per_stage(name: str, values: Sequence[Any]) -> list[Any]:
    """Check a per-stage list has four entries and return it as a plain list."""
    values = list(values)
    if len(values) != 4:
        raise ValueError(
            f"model.{name} has {len(values)} entries; DAT++ needs one per stage (4), e.g. {name}=[a,b,c,d]"
        )
    return values


class DAT(FeatureLevels, nn.Module):
    """DAT++ backbone + classifier as a timm model; the sizes of each variant are in its conf/model file.

    The switches (``use_pes``, ``dwc_pes``, ...) default to DAT++'s design; ``dims``, ``depths``,
    ``heads``, ``stage_spec``, ``groups`` and ``dim_stem`` have no default: they are what a variant is.
    ``out_norms`` adds the official detection backbone's LayerNorm on every stage output
    (``norms.<i>``), applied to what ``forward_intermediates``/``features_only`` return.
    ``attn_impl`` picks the attention kernels (auto | reference | fused, see attention_impl.py);
    it changes no parameter.
    """

    def __init__(
        self,
        dim_stem: int,
        dims: Sequence[int],
        depths: Sequence[int],
        heads: Sequence[int],
        stage_spec: Sequence[Sequence[str]],
        groups: Sequence[int],
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        expansion: int = 4,
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
        drop_path_rate: float = 0.0,
        out_norms: bool = False,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        check_attn_impl(attn_impl)
        dims, depths, heads = _per_stage("dims", dims), _per_stage("depths", depths), _per_stage("heads", heads)
        stage_spec = [[str(kind) for kind in spec] for spec in _per_stage("stage_spec", stage_spec)]
        per_stage = {
            name: _per_stage(name, value)
            for name, value in dict(
                groups=groups,
                strides=strides,
                offset_range_factor=offset_range_factor,
                use_pes=use_pes,
                dwc_pes=dwc_pes,
                fixed_pes=fixed_pes,
                no_offs=no_offs,
                log_cpb=log_cpb,
                ksizes=ksizes,
                nat_ksizes=nat_ksizes,
                use_dwc_mlps=use_dwc_mlps,
                use_lpus=use_lpus,
                layer_scale_values=layer_scale_values,
            ).items()
        }
        for i, spec in enumerate(stage_spec):
            if len(spec) != depths[i]:
                raise ValueError(
                    f"model.stage_spec[{i}] has {len(spec)} blocks but model.depths[{i}]={depths[i]}; make them equal"
                )
            bad = sorted(set(spec) - set(BLOCK_TYPES))
            if bad:
                raise ValueError(
                    f"model.stage_spec[{i}] has unknown block types {bad}; DAT++ blocks are {list(BLOCK_TYPES)}"
                )
            if dims[i] % heads[i]:
                raise ValueError(
                    f"model.heads[{i}]={heads[i]} does not divide model.dims[{i}]={dims[i]}; choose a divisor"
                )
        if img_size % (patch_size * 8):
            raise ValueError(f"model.img_size={img_size} must be a multiple of {patch_size * 8} (patch_size x 8)")

        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate
        self.feature_info = [dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"stages.{i}") for i in range(4)]
        if use_conv_patches:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(in_chans, dim_stem // 2, 3, patch_size // 2, 1),
                ChannelLayerNorm(dim_stem // 2),
                nn.GELU(),
                nn.Conv2d(dim_stem // 2, dim_stem, 3, patch_size // 2, 1),
                ChannelLayerNorm(dim_stem),
            )
        else:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(in_chans, dim_stem, patch_size, patch_size), ChannelLayerNorm(dim_stem)
            )

        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        fmap = img_size // patch_size
        for i in range(4):
            s = {name: value[i] for name, value in per_stage.items()}
            self.stages.append(
                DATStage(
                    (fmap, fmap),
                    dim_stem if i == 0 else dims[i],
                    dims[i],
                    stage_spec[i],
                    heads[i],
                    s["groups"],
                    s["strides"],
                    s["offset_range_factor"],
                    s["use_pes"],
                    s["dwc_pes"],
                    s["no_offs"],
                    s["fixed_pes"],
                    s["log_cpb"],
                    s["ksizes"],
                    s["nat_ksizes"],
                    s["use_dwc_mlps"],
                    s["use_lpus"],
                    s["layer_scale_values"],
                    expansion,
                    drop_rate,
                    attn_drop_rate,
                    drop_path[sum(depths[:i]) : sum(depths[: i + 1])],
                    attn_impl,
                )
            )
            fmap //= 2
        kernel, padding = (3, 1) if use_conv_patches else (2, 0)
        self.down_projs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dims[i], dims[i + 1], kernel, 2, padding, bias=False), ChannelLayerNorm(dims[i + 1])
            )
            for i in range(3)
        )
        self.norms = nn.ModuleList(ChannelLayerNorm(d) for d in dims) if out_norms else None
        self.cls_norm = ChannelLayerNorm(dims[-1])
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.cls_head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position tables are exempt from weight decay, as in the official recipe (timm reads this)."""
        return {name for name, _ in self.named_parameters() if "rpe_table" in name}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward pass instead of storing its activations."""
        for stage in self.stages:
            if isinstance(stage, DATStage):
                stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.cls_head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh ``num_classes`` head (0: none); ``global_pool=''`` keeps the map unpooled."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.cls_head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def fresh_modules(self) -> list[str]:
        """The detection norms: ImageNet checkpoints (official or das-lab) have none."""
        return ["norms"] if self.norms is not None else []

    def filter_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official DAT++ / das-lab keys fitted to this model (see :func:`checkpoint_filter_fn`)."""
        return adapt_state_dict(state, self)

    def _stage(self, i: int, x: Tensor) -> tuple[Tensor, list[tuple[int, Tensor, Tensor]]]:
        """Stage ``i`` (after the down-projection that feeds it), with its deformable blocks' sampling."""
        if i > 0:
            x = self.down_projs[i - 1](x)
        return self.stages[i](x)

    def _level(self, level: int, x: Tensor) -> Tensor:
        return self._stage(level, self.patch_proj(x) if level == 0 else x)[0]

    def _present_levels(self) -> int:
        return len(self.stages)

    def _level_output(self, level: int, x: Tensor, norm: bool) -> Tensor:
        """With ``out_norms`` the stage norm (official detection outputs); else ``norm`` normalises the last map."""
        if self.norms is not None:
            return self.norms[level](x)
        return self.cls_norm(x) if norm and level == 3 else x

    def _prune_levels_after(self, level: int) -> None:
        self.stages = self.stages[: level + 1]
        self.down_projs = self.down_projs[:level]

    def _prune_norm(self) -> None:
        self.cls_norm = nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage map (B, dims[-1], H/32, W/32), before the classification norm."""
        return self._forward_levels(x)

    @torch.jit.ignore
    def forward_sampling(self, x: Tensor) -> tuple[list[Tensor], list[DeformableSampling]]:
        """The four stage maps and, for each deformable block, where it sampled its keys (for the figures)."""
        x = self.patch_proj(x)
        features, sampling = [], []
        for i in range(len(self.stages)):
            x, samples = self._stage(i, x)
            features.append(x)
            sampling.extend(DeformableSampling(i, block, pos, ref) for block, pos, ref in samples)
        return features, sampling

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Classification norm, pooling, then logits (pooled features with ``pre_logits`` or num_classes=0)."""
        x = self.global_pool(self.cls_norm(x))
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.cls_head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def adapt_state_dict(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """An official DAT++ or das-lab state_dict with its position tables resized bicubically to ``model``'s."""
    own = model.state_dict()
    adapted = {}
    for key, value in unwrap_state_dict(state_dict).items():
        target = own.get(key)
        if key.endswith("rpe_table") and target is not None and value.dim() == 3 and target.shape != value.shape:
            value = F.interpolate(value[None].float(), size=target.shape[1:], mode="bicubic")[0].to(value.dtype)
        adapted[key] = value
    return adapted


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: DAT) -> dict[str, Tensor]:
    """timm's ``pretrained=True`` filter: official keys adapted; a head of another size and detection norms start fresh."""
    adapted = adapt_state_dict(state_dict, model)
    for key, value in model.state_dict().items():
        if key.startswith("cls_head.") and (key not in adapted or adapted[key].shape != value.shape):
            log.warning(
                "checkpoint head %s does not fit a %d-class model: keeping a fresh head", key, model.num_classes
            )
            adapted[key] = value
    return fill_fresh(adapted, model)


_OFFICIAL = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"
_CFG: dict[str, Any] = dict(
    num_classes=1000,
    input_size=(3, 224, 224),
    pool_size=(7, 7),
    crop_pct=0.9,
    interpolation="bicubic",
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
    first_conv="patch_proj.0",
    classifier="cls_head",
    license="apache-2.0",
    paper_ids="arXiv:2309.01430",
    paper_name="DAT++: Spatially Dynamic Vision Transformer with Deformable Attention",
    origin_url="https://github.com/LeapLabTHU/DAT",
)
default_cfgs = generate_default_cfgs(
    {
        "dat_tiny.in1k": dict(_CFG, url=_OFFICIAL.format("14c5ddae10b642e68089"), notes=("dat_pp_tiny_in1k_224.pth",)),
        "dat_small.in1k": dict(
            _CFG, url=_OFFICIAL.format("4c2a76360c964fbd81d5"), notes=("dat_pp_small_in1k_224.pth",)
        ),
        "dat_base.in1k": dict(_CFG, url=_OFFICIAL.format("8e30492404d348d89f25"), notes=("dat_pp_base_in1k_224.pth",)),
        "dat_base.in1k_384": dict(
            _CFG,
            url=_OFFICIAL.format("032dc804cdf44bf18bb5"),
            input_size=(3, 384, 384),
            pool_size=(12, 12),
            crop_pct=1.0,
            notes=("dat_pp_base_in1k_384.pth; build with img_size=384",),
        ),
        "dat_nano": dict(_CFG, input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)


def _create(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> DAT:
    return create_variant(DAT, variant, variant, pretrained, kwargs, checkpoint_filter_fn, lambda m: (0, 1, 2, 3))


@register_model
def dat_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-T++ (24M params, 4.3 GFLOPs at 224)."""
    return _create("dat_tiny", pretrained, kwargs)


@register_model
def dat_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-S++ (53M params, 9.4 GFLOPs at 224)."""
    return _create("dat_small", pretrained, kwargs)


@register_model
def dat_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-B++ (94M params, 16.6 GFLOPs at 224; use img_size=384 for the 384 fine-tuned model)."""
    return _create("dat_base", pretrained, kwargs)


@register_model
def dat_nano(pretrained: bool = False, **kwargs: Any) -> DAT:
    """A small DAT++ that trains on 64x64 images on a CPU in minutes."""
    return _create("dat_nano", pretrained, kwargs)
