"""DAT++ attention kernels, reference against fused: time and peak memory of DAT-T++ (training and inference).

Usage: python benchmarks/dat_attention.py [--device auto|cpu|cuda] [--model dat_tiny] [--size 224]
       [--batch 2] [--warmup 1] [--repeats 3] [--out dat_attention.json]

Rows (``model.attn_impl`` of the same weights):
- train: forward, mean of the logits, backward (no optimizer). torch 2.14 has no flex_attention
  backward on CPU, so there fused neighborhood attention runs flex_attention's forward and a backward
  that recomputes the windows a band of query rows at a time (``FlexForwardBandedBackward``);
- inference: forward without autograd; fused neighborhood attention is compiled flex_attention,
  whose compilation is the first call (``first call s``), not counted in the median.
Times are medians of ``--repeats`` calls after ``--warmup``, the paths timed in turn (A, B, A, B)
so that a shared machine's load falls on both; peak memory is what one call allocates beyond what
exists (das_lab.profile.peak_memory_mib: CUDA allocator stats, CPU profiler allocation events).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn
from train_step import interleaved_seconds

import das_lab.models  # noqa: F401  (registers das-lab's backbones in timm)
from das_lab.utils.tables import markdown_table, measured
from das_lab.utils.timing import (
    backward_step,
    example_input,
    forward_step,
    peak_memory_mib,
    resolve_device,
    synchronize,
)


def build(name: str, attn_impl: str, device: torch.device) -> nn.Module:
    """``name`` with seed-0 weights on ``attn_impl`` kernels."""
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=1000, attn_impl=attn_impl, drop_path_rate=0.0).to(device)


def paths(
    name: str, device: torch.device, x: torch.Tensor, modes: list[str]
) -> dict[str, dict[str, Callable[[], None]]]:
    """Per mode, the reference and the fused step of the same weights."""
    steps = {}
    if "train" in modes:
        steps["train"] = {
            "reference": backward_step(build(name, "reference", device).train(), x, "fp32"),
            "fused": backward_step(build(name, "fused", device).train(), x, "fp32"),
        }
    if "inference" in modes:
        steps["inference"] = {
            "reference": forward_step(build(name, "reference", device).eval(), x, "fp32"),
            "fused": forward_step(build(name, "fused", device).eval(), x, "fp32"),
        }
    return steps


def measure(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """First-call seconds, median seconds and peak MiB of each step."""
    first = {}
    for label, step in steps.items():
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        first[label] = time.perf_counter() - start
    seconds = interleaved_seconds(steps, device, warmup, repeats)
    return {
        label: {"first_s": first[label], "median_s": seconds[label], "peak_mib": peak_memory_mib(step, device)}
        for label, step in steps.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="dat_tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    device = resolve_device(args.device)
    x = example_input((args.batch, 3, args.size, args.size), device)
    results: dict[str, Any] = {
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    rows = []
    for mode, steps in paths(args.model, device, x, args.modes).items():
        results[mode] = measure(steps, device, args.warmup, args.repeats)
        print(f"  {mode}: {json.dumps(results[mode])}", flush=True)
        reference = results[mode]["reference"]
        for label, figures in results[mode].items():
            rows.append(
                measured(
                    [
                        mode,
                        label,
                        figures["median_s"],
                        figures["median_s"] / reference["median_s"],
                        figures["peak_mib"],
                        figures["peak_mib"] / reference["peak_mib"],
                        figures["first_s"],
                    ]
                )
            )
    print(
        f"{args.model} batch {args.batch} at {args.size} px on {device} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    header = ("mode", "path", "median s", "x reference", "peak MiB", "x reference", "first call s")
    print(markdown_table(header, rows, align="llrrrrr"))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
