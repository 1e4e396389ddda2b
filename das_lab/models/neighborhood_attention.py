"""Neighborhood attention (NAT), the local block of DAT++: a gather reference and a flex_attention kernel.

Every query at (i, j) attends to a ``kernel_size x kernel_size`` window of keys centred on it;
near the borders the window is shifted inwards so that it keeps its full size (NATTEN's
definition). A learned relative position bias ``rpb`` of shape (heads, 2k-1, 2k-1) is added,
indexed by the key-minus-query displacement.

Two kernels compute the same function (``model.attn_impl``, see attention_impl.py):
- reference: gathers every query's window of keys and values (memory ~k*k times the map per head);
- fused: ``flex_attention`` compiled, with the window as a block mask and the bias as a
  ``score_mod``; it never materialises windows. torch 2.14 has no flex_attention backward on CPU,
  so CPU training runs the flex forward and a backward that recomputes the gather a band of query
  rows at a time (:class:`FlexForwardBandedBackward`): the windows of one band live at a time,
  never the windows of the whole map for the whole network, as the reference keeps for backward.

Feature maps smaller than the window: the window is clamped to the map along that axis, so
every query attends to the whole map (the limit of the neighborhood definition when the map
equals the window). The official DAT++ code instead zero-pads such maps to the window size
before the qkv projection, so the padded positions enter the softmax; the two differ only for
maps smaller than 7 (inputs below 112 pixels for stage 3), never at ImageNet or detection sizes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from timm.models import register_notrace_module
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from das_lab.models.attention_impl import check_attn_impl, records_grad, use_fused

_ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
_MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@functools.cache
def compiled_flex(device_type: str) -> Callable[..., Tensor]:
    """flex_attention compiled for ``device_type``: shape-specialised on CPU, whose code generation
    fails for dynamic shapes in torch 2.14; automatic dynamic shapes elsewhere, so that new batch
    sizes do not exhaust dynamo's recompile limit (past it flex_attention runs densely)."""
    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def neighborhood_indices(length: int, kernel_size: int, device: torch.device | None = None) -> Tensor:
    """Key positions (length, min(kernel_size, length)) each query position attends to along one axis."""
    window = min(kernel_size, length)
    positions = torch.arange(length, device=device)
    start = (positions - kernel_size // 2).clamp(min=0, max=length - window)
    return start[:, None] + torch.arange(window, device=device)[None, :]


def _window_start(position: int, length: int, kernel_size: int) -> int:
    """First key position of ``position``'s window along an axis of ``length`` (:func:`neighborhood_indices` in ints)."""
    return min(max(position - kernel_size // 2, 0), length - min(kernel_size, length))


def _windows(height: int, width: int, kernel_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row/column key indices and their relative-position-bias indices for every query."""
    rows = neighborhood_indices(height, kernel_size, device)
    cols = neighborhood_indices(width, kernel_size, device)
    rel_rows = rows - torch.arange(height, device=device)[:, None] + kernel_size - 1
    rel_cols = cols - torch.arange(width, device=device)[:, None] + kernel_size - 1
    return rows, cols, rel_rows, rel_cols


def _gather(t: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(B, heads, H, W, D) -> (B, heads, R, W, kh, kw, D): the neighborhoods of ``t`` of R query rows.

    ``rows`` (R, kh) and ``cols`` (W, kw) index ``t``'s rows and columns. Two index_select calls
    (backward: index_add) instead of one advanced index, whose accumulating backward is several
    times slower on CPU.
    """
    batch, heads, _, width, dim = t.shape
    (query_rows, kh), (_, kw) = rows.shape, cols.shape
    t = t.index_select(2, rows.flatten()).index_select(3, cols.flatten())
    return t.view(batch, heads, query_rows, kh, width, kw, dim).permute(0, 1, 2, 4, 3, 5, 6)


def _window_logits(
    q: Tensor, k: Tensor, rpb: Tensor | None, rows: Tensor, cols: Tensor, rel_rows: Tensor, rel_cols: Tensor
) -> Tensor:
    """Logits (B, heads, R, W, kh*kw) of the R query rows of ``q`` over their windows of ``k`` (see :func:`_gather`)."""
    logits = torch.einsum("bnhwd,bnhwijd->bnhwij", q, _gather(k, rows, cols))
    if rpb is not None:
        logits = logits + rpb[:, rel_rows[:, None, :, None], rel_cols[None, :, None, :]].unsqueeze(0)
    return logits.flatten(-2)


def _window_sum(attn: Tensor, v: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Attention-weighted sums (B, heads, R, W, D) of the R query rows' windows of ``v``."""
    attn = attn.unflatten(-1, (rows.shape[1], cols.shape[1]))
    return torch.einsum("bnhwij,bnhwijd->bnhwd", attn, _gather(v, rows, cols))


def _attend_windows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    windows: tuple[Tensor, Tensor, Tensor, Tensor],
    attn_drop: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The gather reference for the query rows of ``q``: softmax of the window logits, weighted sum of ``v``.

    ``windows`` is :func:`_windows`' (rows, cols, rel_rows, rel_cols) for those rows, rows indexing ``k``/``v``.
    """
    rows, cols = windows[:2]
    attn = _window_logits(q, k, rpb, *windows).softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    return _window_sum(attn, v, rows, cols)


def na2d_logits_torch(q: Tensor, k: Tensor, rpb: Tensor | None, kernel_size: int) -> Tensor:
    """Query-key logits (B, heads, H, W, kh*kw) plus relative position bias, pure PyTorch."""
    _, _, height, width, _ = q.shape
    return _window_logits(q, k, rpb, *_windows(height, width, kernel_size, q.device))


def na2d_aggregate_torch(attn: Tensor, v: Tensor, kernel_size: int) -> Tensor:
    """Attention-weighted sum of each query's neighborhood values (B, heads, H, W, D), pure PyTorch."""
    _, _, height, width, _ = v.shape
    rows, cols, _, _ = _windows(height, width, kernel_size, v.device)
    return _window_sum(attn, v, rows, cols)


def na2d_backward_by_bands(
    q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel_size: int, grad_out: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of neighborhood attention (pre-scaled ``q``) for ``grad_out``, recomputed a band of query rows at a time.

    Each band of ``max(1, H // kernel_size)`` query rows recomputes the gather reference for its
    rows over the key rows its windows reach and back-propagates through it: the peak extra memory
    is one band's windows (about ``kernel_size`` times the map instead of ``kernel_size**2``).
    """
    height, width = q.shape[2:4]
    rows, cols, rel_rows, rel_cols = _windows(height, width, kernel_size, q.device)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grad_rpb = None if rpb is None else torch.zeros_like(rpb)
    band, window = max(1, height // kernel_size), min(kernel_size, height)
    for top in range(0, height, band):
        bottom = min(top + band, height)
        first, last = _window_start(top, height, kernel_size), _window_start(bottom - 1, height, kernel_size) + window
        with torch.enable_grad():
            q_band, k_band, v_band = (
                t.detach().requires_grad_(True) for t in (q[:, :, top:bottom], k[:, :, first:last], v[:, :, first:last])
            )
            rpb_leaf = None if rpb is None else rpb.detach().requires_grad_(True)
            band_windows = (rows[top:bottom] - first, cols, rel_rows[top:bottom], rel_cols)
            out = _attend_windows(q_band, k_band, v_band, rpb_leaf, band_windows)
            leaves = [t for t in (q_band, k_band, v_band, rpb_leaf) if t is not None]
            grads = torch.autograd.grad(out, leaves, grad_out[:, :, top:bottom])
        grad_q[:, :, top:bottom] = grads[0]
        grad_k[:, :, first:last] += grads[1]
        grad_v[:, :, first:last] += grads[2]
        if grad_rpb is not None:
            grad_rpb += grads[3]
    return grad_q, grad_k, grad_v, grad_rpb


def window_mask_mod(height: int, width: int, kernel_size: int) -> _MaskMod:
    """flex_attention ``mask_mod`` of the clamped windows of a row-major (height, width) map."""
    win_h, win_w = min(kernel_size, height), min(kernel_size, width)

    def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        top = (q_idx // width - kernel_size // 2).clamp(0, height - win_h)
        left = (q_idx % width - kernel_size // 2).clamp(0, width - win_w)
        row, col = kv_idx // width, kv_idx % width
        return (row >= top) & (row < top + win_h) & (col >= left) & (col < left + win_w)

    return mask_mod


def rpb_score_mod(rpb: Tensor, width: int, kernel_size: int) -> _ScoreMod:
    """flex_attention ``score_mod`` adding ``rpb[head, dy + k - 1, dx + k - 1]`` (dy, dx: key minus query)."""
    last = 2 * kernel_size - 2

    def score_mod(score: Tensor, batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # outside the window the indices leave the table; those scores are masked, the clamp keeps reads in bounds
        dy = (kv_idx // width - q_idx // width + kernel_size - 1).clamp(0, last)
        dx = (kv_idx % width - q_idx % width + kernel_size - 1).clamp(0, last)
        return score + rpb[head, dy, dx]

    return score_mod


@functools.lru_cache(maxsize=32)
def window_block_mask(height: int, width: int, kernel_size: int, device: torch.device) -> BlockMask:
    """The block-sparse layout of the windows, built once per map size (it does not depend on the batch)."""
    length = height * width
    return create_block_mask(window_mask_mod(height, width, kernel_size), None, None, length, length, device=device)


class FlexForwardBandedBackward(torch.autograd.Function):
    """flex_attention's forward with :func:`na2d_backward_by_bands` as backward: CPU training, where
    torch 2.14's flex_attention has no backward. Saves only the inputs."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # backward recomputes under the forward's autocast state
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel_size: int) -> Tensor:
        ctx.save_for_backward(q, k, v, rpb)
        ctx.kernel_size = kernel_size
        detached = (t.detach() for t in (q, k, v))  # flex_attention refuses CPU inputs that require grad
        return _flex_forward(*detached, None if rpb is None else rpb.detach(), kernel_size)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, rpb = ctx.saved_tensors
        return (*na2d_backward_by_bands(q, k, v, rpb, ctx.kernel_size, grad_out), None)


def na2d_flex(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel_size: int) -> Tensor:
    """Neighborhood attention of pre-scaled ``q`` over ``k``/``v`` (all (B, heads, H, W, D)) by compiled flex_attention."""
    if q.device.type == "cpu" and records_grad(q, k, v, *([] if rpb is None else [rpb])):
        return FlexForwardBandedBackward.apply(q, k, v, rpb, kernel_size)
    return _flex_forward(q, k, v, rpb, kernel_size)


def _flex_forward(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel_size: int) -> Tensor:
    height, width = q.shape[2:4]
    score_mod = None if rpb is None else rpb_score_mod(rpb, width, kernel_size)
    if torch.compiler.is_compiling():  # inside a compiled model (task.compile): traced into its graph, no caches
        attend = flex_attention
        block_mask = create_block_mask(
            window_mask_mod(height, width, kernel_size), None, None, height * width, height * width, device=q.device
        )
    else:
        attend, block_mask = compiled_flex(q.device.type), window_block_mask(height, width, kernel_size, q.device)
    out = attend(
        q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), score_mod=score_mod, block_mask=block_mask, scale=1.0
    )
    return out.unflatten(2, (height, width))


def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    kernel_size: int,
    attn_drop: Callable[[Tensor], Tensor] | None = None,
    fused: bool = False,
) -> Tensor:
    """Neighborhood attention of pre-scaled ``q`` over ``k``/``v`` (all (B, heads, H, W, D)).

    ``fused`` runs :func:`na2d_flex` (which has no attention dropout), else the gather reference.
    Shape-only fake tensors (FLOP counting, ``das_lab.utils.flops``) take the reference, whose
    FLOPs are the papers' count and which fake tensors can run (eager flex_attention they cannot).
    """
    if fused and not is_fake(q):
        return na2d_flex(q, k, v, rpb, kernel_size)
    height, width = q.shape[2:4]
    return _attend_windows(q, k, v, rpb, _windows(height, width, kernel_size, q.device), attn_drop)


@register_notrace_module  # one FX leaf: windows depend on the map size and the kernel choice is Python
class NeighborhoodAttention2D(nn.Module):
    """DAT++'s 'N' block attention on (B, C, H, W) maps; parameter names match the official code."""

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.attn_impl = check_attn_impl(attn_impl)
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"nat_ksizes entry {kernel_size} is invalid; neighborhood windows must be odd and >= 3")
        if dim % num_heads:
            raise ValueError(f"{dim} channels do not split into {num_heads} heads; choose heads dividing the width")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
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
        dropout = self.training and self.attn_drop.p > 0
        fused = use_fused(self.attn_impl, x.device, dropout)
        out = neighborhood_attention(q * self.scale, k, v, self.rpb, self.kernel_size, self.attn_drop, fused)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, channels)
        return self.proj_drop(self.proj(out)).permute(0, 3, 1, 2)


__all__ = [
    "FlexForwardBandedBackward",
    "NeighborhoodAttention2D",
    "na2d_backward_by_bands",
    "neighborhood_attention",
    "neighborhood_indices",
    "na2d_logits_torch",
    "na2d_aggregate_torch",
    "na2d_flex",
    "rpb_score_mod",
    "window_block_mask",
    "window_mask_mod",
]
