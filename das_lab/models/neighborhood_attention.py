"""Neighborhood attention (NAT), the local block of DAT++, in pure PyTorch with NATTEN dispatch.

Every query at (i, j) attends to a ``kernel_size x kernel_size`` window of keys centred on it;
near the borders the window is shifted inwards so that it keeps its full size (NATTEN's
definition). A learned relative position bias ``rpb`` of shape (heads, 2k-1, 2k-1) is added,
indexed by the key-minus-query displacement.

NATTEN's kernels are used when the package imports, supports relative position bias, passes
a one-off numerical self-check against the PyTorch path on the tensor's device type, and the
feature map is at least as large as the window. Otherwise the PyTorch path runs; its results
are identical up to float rounding.

Feature maps smaller than the window: the window is clamped to the map along that axis, so
every query attends to the whole map (the limit of the neighborhood definition when the map
equals the window). The official DAT++ code instead zero-pads such maps to the window size
before the qkv projection, so the padded positions enter the softmax; the two differ only for
maps smaller than 7 (inputs below 112 pixels for stage 3), never at ImageNet or detection sizes.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from timm.models import register_notrace_module
from torch import Tensor, nn

log = logging.getLogger(__name__)

_NattenOps = tuple[Callable[..., Tensor], Callable[..., Tensor]]
_natten_ok: dict[str, bool] = {}


def neighborhood_indices(length: int, kernel_size: int, device: torch.device | None = None) -> Tensor:
    """Key positions (length, min(kernel_size, length)) each query position attends to along one axis."""
    window = min(kernel_size, length)
    positions = torch.arange(length, device=device)
    start = (positions - kernel_size // 2).clamp(min=0, max=length - window)
    return start[:, None] + torch.arange(window, device=device)[None, :]


def _windows(height: int, width: int, kernel_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row/column key indices and their relative-position-bias indices for every query."""
    rows = neighborhood_indices(height, kernel_size, device)
    cols = neighborhood_indices(width, kernel_size, device)
    rel_rows = rows - torch.arange(height, device=device)[:, None] + kernel_size - 1
    rel_cols = cols - torch.arange(width, device=device)[:, None] + kernel_size - 1
    return rows, cols, rel_rows, rel_cols


def _gather(t: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(B, heads, H, W, D) -> (B, heads, H, W, kh, kw, D): each query's neighborhood of ``t``.

    Two index_select calls (backward: index_add) instead of one advanced index, whose accumulating
    backward is several times slower on CPU.
    """
    batch, heads, height, width, dim = t.shape
    (_, kh), (_, kw) = rows.shape, cols.shape
    t = t.index_select(2, rows.flatten()).index_select(3, cols.flatten())
    return t.view(batch, heads, height, kh, width, kw, dim).permute(0, 1, 2, 4, 3, 5, 6)


def na2d_logits_torch(q: Tensor, k: Tensor, rpb: Tensor | None, kernel_size: int) -> Tensor:
    """Query-key logits (B, heads, H, W, kh*kw) plus relative position bias, pure PyTorch."""
    _, _, height, width, _ = q.shape
    rows, cols, rel_rows, rel_cols = _windows(height, width, kernel_size, q.device)
    logits = torch.einsum("bnhwd,bnhwijd->bnhwij", q, _gather(k, rows, cols))
    if rpb is not None:
        logits = logits + rpb[:, rel_rows[:, None, :, None], rel_cols[None, :, None, :]].unsqueeze(0)
    return logits.flatten(-2)


def na2d_aggregate_torch(attn: Tensor, v: Tensor, kernel_size: int) -> Tensor:
    """Attention-weighted sum of each query's neighborhood values (B, heads, H, W, D), pure PyTorch."""
    _, _, height, width, _ = v.shape
    rows, cols, _, _ = _windows(height, width, kernel_size, v.device)
    attn = attn.unflatten(-1, (rows.shape[1], cols.shape[1]))
    return torch.einsum("bnhwij,bnhwijd->bnhwd", attn, _gather(v, rows, cols))


def _import_natten() -> _NattenOps | None:
    """NATTEN's (qk with bias, av) functions in whichever of its APIs is installed, or None."""
    try:
        from natten.functional import na2d_av, na2d_qk  # NATTEN 0.15 - 0.17
    except ImportError:
        try:
            from natten.functional import natten2dav, natten2dqkrpb  # NATTEN <= 0.14
        except ImportError:
            return None
        return (lambda q, k, rpb, ks: natten2dqkrpb(q, k, rpb, ks, 1), lambda a, v, ks: natten2dav(a, v, ks, 1))
    return (lambda q, k, rpb, ks: na2d_qk(q, k, ks, 1, rpb=rpb), lambda a, v, ks: na2d_av(a, v, ks, 1))


_NATTEN = _import_natten()


def natten_available() -> bool:
    """Whether a NATTEN version with relative-position-bias support is importable."""
    return _NATTEN is not None


def natten_works(device: torch.device) -> bool:
    """One-off check that NATTEN runs on ``device`` and agrees with the PyTorch path."""
    if _NATTEN is None:
        return False
    if device.type not in _natten_ok:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 9, 10, 8, generator=gen).to(device) for _ in range(3))
        rpb = torch.randn(2, 13, 13, generator=gen).to(device)
        try:
            with torch.no_grad():
                attn = _NATTEN[0](q, k, rpb, 7).softmax(-1)
                out = _NATTEN[1](attn, v, 7)
            ref = na2d_aggregate_torch(na2d_logits_torch(q, k, rpb, 7).softmax(-1), v, 7)
            ok = out.shape == ref.shape and torch.allclose(out.float(), ref.float(), atol=1e-4)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
            log.warning("NATTEN is installed but failed on %s (%s); using pure-PyTorch neighborhood attention", device, err)
            ok = False
        if not ok:
            log.warning("NATTEN disagrees with the PyTorch reference on %s; using pure-PyTorch neighborhood attention", device)
        _natten_ok[device.type] = ok
    return _natten_ok[device.type]


def neighborhood_attention(
    q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel_size: int,
    attn_drop: Callable[[Tensor], Tensor] | None = None, use_natten: bool | None = None,
) -> Tensor:
    """Neighborhood attention of pre-scaled ``q`` over ``k``/``v`` (all (B, heads, H, W, D)).

    ``use_natten=None`` picks NATTEN where it works and the map is at least the window size;
    True forces it (errors if it cannot run), False forces the PyTorch path.
    """
    height, width = q.shape[2:4]
    fits = height >= kernel_size and width >= kernel_size
    if use_natten is None:
        use_natten = fits and natten_works(q.device)
    elif use_natten and not (_NATTEN is not None and fits):
        raise RuntimeError(
            f"use_natten=True needs NATTEN with rpb support installed (available: {natten_available()}) and a map "
            f"of at least {kernel_size}x{kernel_size} (got {height}x{width}); pass use_natten=None to fall back"
        )
    qk, av = (_NATTEN if use_natten else (na2d_logits_torch, na2d_aggregate_torch))
    attn = qk(q, k, rpb, kernel_size).softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    return av(attn, v, kernel_size)


@register_notrace_module  # one FX leaf: windows depend on the map size and NATTEN dispatch is Python
class NeighborhoodAttention2D(nn.Module):
    """DAT++'s 'N' block attention on (B, C, H, W) maps; parameter names match the official code."""

    def __init__(self, dim: int, kernel_size: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"nat_ksizes entry {kernel_size} is invalid; neighborhood windows must be odd and >= 3")
        if dim % num_heads:
            raise ValueError(f"{dim} channels do not split into {num_heads} heads; choose heads dividing the width")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.qkv = nn.Linear(dim, dim * 3)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        batch, channels, height, width = x.shape
        qkv = self.qkv(x.permute(0, 2, 3, 1)).reshape(batch, height, width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)
        out = neighborhood_attention(q * self.scale, k, v, self.rpb, self.kernel_size, self.attn_drop)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, channels)
        return self.proj_drop(self.proj(out)).permute(0, 3, 1, 2)


__all__ = ["NeighborhoodAttention2D", "neighborhood_attention", "neighborhood_indices", "natten_available", "natten_works",
           "na2d_logits_torch", "na2d_aggregate_torch"]
