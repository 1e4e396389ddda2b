"""Print params (M) and GFLOPs of the ADE20K segmentors at 2048x512, as the segmentation papers count them.

Usage: ``python benchmarks/segmentation_cost.py [--experiments ade20k_upernet_dat_tiny ...] [--size 512 2048]``
Each experiment config is composed as ``das-lab train +experiment=NAME`` would and its segmentor
(backbone, decode head, auxiliary head) built without weights. GFLOPs are multiply-accumulates
counted by das_lab.utils.flops on one (1, 3, H, W) input in evaluation mode, where the auxiliary
head does not run; params are given with and without it (papers count the inference model).
"""

from __future__ import annotations

import argparse

from das_lab.config import config_dir
from das_lab.data.verify import compose_config
from das_lab.pipeline import build_module
from das_lab.utils.flops import count_gmacs, count_params

DEFAULT = sorted(p.stem for p in (config_dir() / "experiment").glob("ade20k_*.yaml"))


def main() -> None:
    """Build each experiment's segmentor and print one markdown row per experiment."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=DEFAULT)
    parser.add_argument("--size", nargs=2, type=int, default=(512, 2048), metavar=("HEIGHT", "WIDTH"))
    args = parser.parse_args()
    height, width = args.size
    print(f"| experiment | params (M) | params without aux head (M) | GFLOPs @{width}x{height} |")
    print("|---|---:|---:|---:|")
    for name in args.experiments:
        cfg = compose_config([f"+experiment={name}", "model.checkpoint=null"])
        _, module = build_module(cfg.model, cfg.task, cfg.optimizer, cfg.get("scheduler"))
        segmentor = module.segmentor
        aux = count_params(segmentor.aux_head) if segmentor.aux_head is not None else 0
        gmacs = count_gmacs(segmentor, (1, 3, height, width))
        params = count_params(segmentor)
        print(f"| {name} | {params / 1e6:.2f} | {(params - aux) / 1e6:.2f} | {gmacs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
