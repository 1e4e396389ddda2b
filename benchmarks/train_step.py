"""Training-step time of DAS-ResNet-50 against the same ResNet-50 without gates (target: <= 1.15x on a GPU).

Usage: python benchmarks/train_step.py [--device auto|cpu|cuda] [--batch N] [--size PX]
       [--models daslab_resnet50 das_resnet50] [--precision fp32|bf16|fp16] [--channels-last] [--compile]
One step = forward (autocast when asked), cross-entropy, backward, SGD-momentum update; the time
is the median of --repeats steps after --warmup steps. The models' steps are timed in turn
(A, B, A, B, ...) so that a shared machine's changing load falls on all of them alike.
Defaults: batch 8 at 128 px on the CPU, batch 64 at 224 px on a GPU. The first model is the
reference of the ratio column.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F

import das_lab.models  # noqa: F401  (registers das-lab's backbones in timm)
from das_lab.tasks.speed import apply_speed_options
from das_lab.utils.tables import markdown_table, measured
from das_lab.utils.timing import autocast, example_input, resolve_device, synchronize


def train_step(
    name: str,
    batch: int,
    size: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
    compile: bool = False,
    compile_backend: str = "inductor",
    model_args: dict[str, Any] | None = None,
) -> Callable[[], None]:
    """One full optimisation step of ``name`` (1000 classes, constructor ``model_args``) on fixed random data.

    ``channels_last`` and ``compile`` are applied as ``task.channels_last`` / ``task.compile`` apply them.
    """
    model = timm.create_model(name, num_classes=1000, **(model_args or {})).to(device).train()
    apply_speed_options(model, compile, channels_last, compile_backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = example_input((batch, 3, size, size), device, channels_last)
    target = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()

    return step


def interleaved_seconds(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per step of each model, timing the models in turn after ``warmup`` steps each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    parser.add_argument("--size", type=int, default=None, help="default: 128 on CPU, 224 on GPU")
    parser.add_argument("--models", nargs="+", default=["daslab_resnet50", "das_resnet50"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (as task.compile=true)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    batch = args.batch or (64 if on_gpu else 8)
    size = args.size or (224 if on_gpu else 128)
    print(
        f"train step on {device} ({torch.cuda.get_device_name(device) if on_gpu else f'{torch.get_num_threads()} threads'}), "
        f"batch {batch} at {size}px, {args.precision}{', channels_last' if args.channels_last else ''}"
        f"{', compiled' if args.compile else ''}; "
        f"median of {args.repeats} after {args.warmup} warm-up",
        flush=True,
    )
    steps = {
        name: train_step(name, batch, size, device, args.precision, args.channels_last, args.compile)
        for name in args.models
    }
    seconds = interleaved_seconds(steps, device, args.warmup, args.repeats)
    reference = seconds[args.models[0]]
    print(
        markdown_table(
            ("model", "ms/step", "img/s", f"time x {args.models[0]}"),
            [measured([name, 1000 * s, batch / s, s / reference]) for name, s in seconds.items()],
            align="lrrr",
        )
    )


if __name__ == "__main__":
    main()
