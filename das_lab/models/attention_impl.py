"""Which attention kernel DAT++'s blocks run: the reference einsum/gather path or a fused torch kernel.

``attn_impl`` (a DAT constructor argument, ``model.attn_impl``) is one of:

- ``reference``: the einsum + softmax formulation that mirrors the official code (materialises the
  attention matrix; neighborhood attention gathers every window);
- ``fused``: ``scaled_dot_product_attention`` for deformable attention and a compiled
  ``flex_attention`` for neighborhood attention, wherever torch has the kernel (an error names the
  case it lacks: flex_attention has no CPU backward in torch 2.14 and no attention dropout);
- ``auto``: fused on CUDA, reference on CPU and for neighborhood attention while its attention
  dropout is active. Measured on a CPU (benchmarks/dat_attention.py, RESULTS.md): CPU training has
  no fused kernel (flex_attention raises; SDPA falls back to its math kernel when the bias needs a
  gradient); for inference SDPA's CPU kernel with a float mask is slower than the einsum, and
  compiled flex_attention is faster than the gather only after a compilation of tens of seconds
  per map and batch size, so CPU inference takes ``fused`` on request (long runs at one size).
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
