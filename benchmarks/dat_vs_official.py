"""DAT-T++ forward + backward time: das-lab's model against the official LeapLabTHU/DAT model, same weights.

Usage: python benchmarks/dat_vs_official.py --official PATH [--batch 4] [--size 224] [--pairs 7]
       [--warmup 1] [--threads N] [--device cpu|cuda]

PATH is a local copy of https://github.com/LeapLabTHU/DAT (nothing of it is copied into das-lab); the
official code also needs ``einops`` (``pip install einops``).
The official model is built from its own ``configs/dat_tiny.yaml`` and loads das-lab's DAT-T++
weights with ``strict=True``; both models' eval-mode logits are compared before timing. The official
code imports NATTEN, whose current releases no longer take DAT++'s relative position bias; at run
time this script stands das-lab's pure-PyTorch neighborhood attention in for the two NATTEN calls,
so the comparison is of everything else (deformable attention, MLPs, norms, stems).

Timing: train mode (drop path as configured), forward + mean-loss backward, one pass of each model
per pair, the order alternating between pairs so that a changing load falls on both alike. The
table gives the median and the spread (min - max) of each model's time and of the per-pair ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable

import timm
import torch
import yaml
from torch import Tensor, nn

import das_lab.models  # noqa: F401  (registers das-lab's backbones in timm)
from das_lab.models.neighborhood_attention import na2d_aggregate_torch, na2d_logits_torch
from das_lab.utils.tables import markdown_table, measured
from das_lab.utils.timing import backward_step, example_input, resolve_device, synchronize


class _QKWithBias:
    """Stands in for ``natten.functional.NATTEN2DQKRPBFunction``: (q, k, rpb, kernel, dilation) -> logits."""

    @staticmethod
    def apply(q: Tensor, k: Tensor, rpb: Tensor, kernel_size: int, dilation: int) -> Tensor:
        if dilation != 1:
            raise NotImplementedError(f"dilation {dilation}: the stand-in covers DAT++'s dilation 1 only")
        return na2d_logits_torch(q, k, rpb, kernel_size)


class _AttentionValues:
    """Stands in for ``natten.functional.NATTEN2DAVFunction``: (attn, v, kernel, dilation) -> output."""

    @staticmethod
    def apply(attn: Tensor, v: Tensor, kernel_size: int, dilation: int) -> Tensor:
        if dilation != 1:
            raise NotImplementedError(f"dilation {dilation}: the stand-in covers DAT++'s dilation 1 only")
        return na2d_aggregate_torch(attn, v, kernel_size)


def install_natten_stand_in() -> None:
    """Register a ``natten.functional`` module whose two functions are das-lab's PyTorch implementation."""
    functional = types.ModuleType("natten.functional")
    functional.NATTEN2DQKRPBFunction = _QKWithBias
    functional.NATTEN2DAVFunction = _AttentionValues
    package = types.ModuleType("natten")
    package.functional = functional
    sys.modules["natten"] = package
    sys.modules["natten.functional"] = functional


def import_official_models(root: Path) -> types.ModuleType:
    """The official repository's ``models`` package, imported from ``root`` under a private name."""
    init = root / "models" / "__init__.py"
    if not init.is_file() or not (root / "configs" / "dat_tiny.yaml").is_file():
        raise SystemExit(
            f"--official {root}: expected a copy of LeapLabTHU/DAT (models/__init__.py, configs/dat_tiny.yaml)"
        )
    install_natten_stand_in()
    spec = importlib.util.spec_from_file_location(
        "official_dat_models", init, submodule_search_locations=[str(root / "models")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as error:
        raise SystemExit(
            f"the official DAT code imports {error.name}, which is not installed: pip install {error.name}"
        )
    return module


class FirstOutput(nn.Module):
    """The official model returns (logits, positions, references): keep the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[0]


def build_pair(root: Path, size: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """das-lab's DAT-T++ and the official one with the same weights and the official configuration."""
    official_models = import_official_models(root)
    config = yaml.safe_load((root / "configs" / "dat_tiny.yaml").read_text())["MODEL"]["DAT"]
    config["img_size"] = size
    official = official_models.dat.DAT(**config)
    ours = timm.create_model("dat_tiny", img_size=size, drop_path_rate=config["drop_path_rate"])
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device), FirstOutput(official).to(device)


def max_logit_difference(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    """Largest absolute difference of the two models' eval-mode logits on ``x``."""
    a.eval()
    b.eval()
    with torch.no_grad():
        diff = (a(x) - b(x)).abs().max().item()
    a.train()
    b.train()
    return diff


def interleaved_pairs(steps: dict[str, Callable[[], None]], device: torch.device, pairs: int) -> dict[str, list[float]]:
    """Seconds of each step per pair; the order within a pair alternates (AB, BA, AB, ...)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for pair in range(pairs):
        for name in names if pair % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def spread(values: list[float]) -> str:
    """``min - max`` of a series, for the table."""
    return f"{min(values):.3g} - {max(values):.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="local copy of github.com/LeapLabTHU/DAT")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    ours, official = build_pair(args.official.expanduser().resolve(), args.size, device)
    x = example_input((args.batch, 3, args.size, args.size), device)
    diff = max_logit_difference(ours, official, x)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"DAT-T++ forward+backward on {device} ({where}), batch {args.batch} at {args.size}px, fp32, train mode; "
        f"{args.pairs} interleaved pairs after {args.warmup} warm-up; max |logit difference| (eval) {diff:.2e}",
        flush=True,
    )
    steps = {
        "das-lab": backward_step(ours, x, "fp32"),
        "official (PyTorch NA stand-in)": backward_step(official, x, "fp32"),
    }
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = interleaved_pairs(steps, device, args.pairs)
    ours_t, official_t = times.values()
    ratios = [a / b for a, b in zip(ours_t, official_t)]
    rows = [
        [name, 1000 * statistics.median(t), spread([1000 * s for s in t]), args.batch / statistics.median(t)]
        for name, t in times.items()
    ]
    print(markdown_table(("model", "median ms", "spread ms", "img/s"), [measured(row) for row in rows], align="lrrr"))
    print(
        f"\ntime ratio das-lab / official: median {statistics.median(ratios):.3f}, spread {spread(ratios)} "
        f"over {len(ratios)} pairs"
    )


if __name__ == "__main__":
    main()
