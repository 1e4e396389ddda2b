"""Which attention kernel DAT++'s blocks run: the reference einsum/gather path or a fused torch kernel.

``attn_impl`` (a DAT constructor argument, ``model.attn_impl``) is one of:

- ``reference``: the einsum + softmax formulation that mirrors the official code (materialises the
  attention matrix; neighborhood attention gathers every window);
- ``fused``: ``scaled_dot_product_attention`` for deformable attention and a compiled
  ``flex_attention`` for neighborhood attention (an error names the case it lacks: attention
  dropout). torch 2.14 has no flex_attention backward on CPU, so CPU training runs flex_attention's
  forward with a backward that recomputes the windows a band of query rows at a time
  (``neighborhood_attention.FlexForwardBandedBackward``); SDPA takes a bias that needs a gradient
  on every device (on CPU through its math kernel);
- ``auto``: fused on CUDA, reference on CPU and for neighborhood attention while its attention
  dropout is active. Measured on a CPU (benchmarks/dat_attention.py, RESULTS.md), DAT-T++ at 224:
  the fused path trains in 0.39x the reference's peak memory at the same speed and infers in 0.16x,
  but flex_attention compiles for tens of seconds per map size and batch size on CPU (shape-
  specialised there), which short CPU runs with changing shapes never pay back; so CPU takes
  ``fused`` on request (memory-bound or long runs at one size).
"""

from __future__ import annotations

import torch
from torch import Tensor

ATTN_IMPLS = ("auto", "reference", "fused")


def check_attn_impl(value: str) -> str:
    """``value`` if it names a kernel choice, else an error naming the choices (config typos fail at build time)."""
    if value not in ATTN_IMPLS:
        raise ValueError(
            f"model.attn_impl={value!r} is not one of {list(ATTN_IMPLS)}; pick one, e.g. model.attn_impl=auto"
        )
    return value


def records_grad(*tensors: Tensor) -> bool:
    """Whether autograd records an operation on ``tensors`` (training, as opposed to inference)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def use_fused(impl: str, device: torch.device, dropout_active: bool) -> bool:
    """The ``auto`` rule (see module docstring); ``fused``/``reference`` are taken as given.

    ``dropout_active``: the block's attention dropout is on and the fused kernel has none.
    """
    if impl == "fused" and dropout_active:
        raise ValueError(
            "model.attn_impl=fused: flex_attention has no attention dropout but model.attn_drop_rate > 0 in training; "
            "set model.attn_impl=auto (reference while dropout is on) or model.attn_drop_rate=0"
        )
    if impl != "auto":
        return impl == "fused"
    if dropout_active:
        return False
    return device.type == "cuda"


__all__ = ["ATTN_IMPLS", "check_attn_impl", "records_grad", "use_fused"]
