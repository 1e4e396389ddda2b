"""Print params (M), GFLOPs and CPU latency of das-lab's backbones, paper-table style.

Usage: ``python benchmarks/model_table.py [--models das_resnet50 se_resnet50 ...] [--image-size 224]``
Models are timm registry names (see das_lab/models/das_resnet.py for the naming); DAT++ variants
are added when das_lab/models/dat.py registers them. GFLOPs are multiply-accumulates counted by
das_lab.utils.flops (deformable convolution and grid sampling included); latency is the median
wall time of a batch-8 forward pass on the CPU after warm-up.
"""

from __future__ import annotations

import argparse
import importlib

import timm
import torch

from das_lab.utils.flops import count_gmacs, count_params
from das_lab.utils.timing import example_input, forward_step, median_seconds

MODULES = ("das_lab.models.das_resnet", "das_lab.models.das_mobilenet", "das_lab.models.dat")
DEFAULT_MODELS = (
    "daslab_resnet18",
    "das_resnet18",
    "se_resnet18",
    "cbam_resnet18",
    "eca_resnet18",
    "gc_resnet18",
    "daslab_resnet34",
    "das_resnet34",
    "daslab_resnet50",
    "das_resnet50",
    "se_resnet50",
    "cbam_resnet50",
    "eca_resnet50",
    "gc_resnet50",
    "daslab_resnet101",
    "das_resnet101",
    "se_resnet101",
    "cbam_resnet101",
    "eca_resnet101",
    "gc_resnet101",
    "das_mobilenet_v2",
    "resnet_tiny",
    "das_resnet_tiny",
    "dat_tiny",
    "dat_small",
    "dat_base",
)


def import_registering_modules() -> None:
    """Import every das-lab module that registers models; DAT++ is optional until it exists."""
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise


def latency_ms(model: torch.nn.Module, image_size: int, batch: int, repeats: int) -> float:
    """Median forward time of one batch, after one warm-up pass."""
    step = forward_step(model, example_input((batch, 3, image_size, image_size), torch.device("cpu")), "fp32")
    return 1000 * median_seconds(step, torch.device("cpu"), warmup=1, repeats=repeats)


def main() -> None:
    """Measure each requested model and print one markdown row per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=None, help="timm registry names (default: all das-lab backbones)"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import_registering_modules()
    names = args.models or [m for m in DEFAULT_MODELS if timm.is_model(m)]
    print(f"| model | params (M) | GFLOPs @{args.image_size} | CPU latency (ms, batch {args.batch}) |")
    print("|---|---:|---:|---:|")
    for name in names:
        model = timm.create_model(name).eval()
        params = count_params(model) / 1e6
        gmacs = count_gmacs(model, (1, 3, args.image_size, args.image_size))
        ms = latency_ms(model, args.image_size, args.batch, args.repeats)
        print(f"| {name} | {params:.2f} | {gmacs:.2f} | {ms:.0f} |", flush=True)


if __name__ == "__main__":
    main()
