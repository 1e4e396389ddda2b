"""Speed options every task applies to its backbone: ``torch.compile`` and channels-last memory.

Both change how the backbone runs, never what it computes or how its weights are named:

- ``channels_last``: the backbone's 4-D weights move to ``torch.channels_last`` and a forward
  pre-hook hands it its image batch in the same layout, so convolutions run NHWC end to end
  (the fast layout of cuDNN and oneDNN, and of tensor cores under bf16).
- ``compile``: ``nn.Module.compile`` compiles the backbone's forward in place with
  ``compile_backend`` (``inductor``, PyTorch's default; ``aot_eager`` traces the same graphs
  without generating code, for debugging, as timm's ``--torchcompile BACKEND``). The module object and its ``state_dict`` keys stay as they are, so checkpoints of
  compiled and eager runs are interchangeable; the LightningModule around it (loss, metrics,
  logging) stays eager. torchvision's ``deform_conv2d`` has a registered fake kernel and
  autograd formula, so the compiled graph keeps it as one operator (forward and backward) rather
  than decomposing it; tests/test_speed_options.py checks this.

Mixed precision is not a task option: it is Lightning's ``trainer.precision`` (``bf16-mixed`` in
``trainer=gpu``).
"""

from __future__ import annotations

import shutil
from typing import Any, Optional

import torch
from torch import nn

C_COMPILERS = ("cc", "gcc", "clang")


def channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
    """Forward pre-hook: a 4-D image batch enters the backbone in channels-last layout."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
        return None
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def use_channels_last(backbone: nn.Module) -> nn.Module:
    """Store ``backbone``'s 4-D weights and receive its inputs in channels-last layout (in place)."""
    backbone.to(memory_format=torch.channels_last)
    backbone.register_forward_pre_hook(channels_last_input)
    return backbone


def any_c_compiler() -> Optional[str]:
    """Path of the first C compiler on PATH, or None."""
    return next(filter(None, (shutil.which(name) for name in C_COMPILERS)), None)


def check_compiler_available() -> None:
    """TorchInductor builds C++ kernels on CPUs (and Triton its launchers on GPUs): without a C compiler
    the first training step fails deep inside the compiler, so fail before anything runs."""
    if any_c_compiler() is None:
        raise RuntimeError(
            "task.compile=true needs a C compiler for TorchInductor's kernels (none of "
            f"{', '.join(C_COMPILERS)} is on PATH); install one (e.g. apt-get install gcc) or set task.compile=false"
        )


def apply_speed_options(
    backbone: nn.Module, compile: bool, channels_last: bool, compile_backend: str = "inductor"
) -> nn.Module:
    """Apply ``task.channels_last`` and ``task.compile`` to the backbone a task trains (in place)."""
    if channels_last:
        use_channels_last(backbone)
    if compile:
        if compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(
                f"task.compile_backend={compile_backend!r} is not a torch.compile backend; "
                f"common ones: {', '.join(torch._dynamo.list_backends())}, aot_eager"
            )
        if compile_backend == "inductor":
            check_compiler_available()
        backbone.compile(backend=compile_backend)
    return backbone
