"""Timing and peak-memory measurements of model passes, shared by ``das-lab profile`` and benchmarks/.

Times are wall-clock medians after untimed warm-up passes, with the GPU synchronised around each
pass. Peak memory is what one pass allocates beyond the tensors that already exist: on CUDA from
``torch.cuda.max_memory_allocated``, on the CPU from the allocations ``torch.profiler`` records.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from das_lab.errors import UserError

PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2**20


def resolve_device(name: str, option: str = "device") -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; an unavailable GPU is a clear error naming ``option``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}={name} but torch sees no CUDA device; use {option}=cpu (or auto)")
    return device


def precision_dtype(precision: str, option: str = "precision") -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (fp32: none); an unknown name is a clear error naming ``option``."""
    if precision not in PRECISIONS:
        raise UserError(f"{option}={precision} is not supported; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of ``precision`` (fp32: none)."""
    dtype = precision_dtype(precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``step`` after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least one timed pass")
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(step: Callable[[], Any], device: torch.device) -> float:
    """Peak tensor memory one call of ``step`` allocates on ``device`` beyond what already exists (MiB)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    if device.type != "cpu":
        return math.nan
    # kineto's levels end with USDT=5 (its profiler_start/stop lines); 6 silences them, read at each start
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        step()
    allocations = sorted(
        (
            e
            for e in recorded.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        ),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for event in allocations:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / MIB


def forward_step(model: nn.Module, x: torch.Tensor, precision: str) -> Callable[[], None]:
    """One inference pass (no autograd graph)."""

    def step() -> None:
        with torch.no_grad(), autocast(x.device, precision):
            model(x)

    return step


def backward_step(model: nn.Module, x: torch.Tensor, precision: str) -> Callable[[], None]:
    """One forward+backward pass with a scalar loss (no optimizer step)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(x.device, precision):
            out = model(x)
        out.float().mean().backward()

    return step


def example_input(shape: Sequence[int], device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A reproducible random input of ``shape`` on ``device``."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
