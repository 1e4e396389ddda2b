"""DAS gate vs plain ResNet on the embedded cluttered digits, at equal epochs and seeds.

Runs ``das-lab train +experiment=digits_das`` and ``+experiment=digits_resnet`` through the real
CLI for each seed and prints test top-1 (mean +- std), params, GFLOPs and wall time.

    python benchmarks/digits_das_vs_resnet.py --seeds 0 1 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

EXPERIMENTS = ("digits_resnet", "digits_das")


def run(experiment: str, seed: int, epochs: int, out: Path) -> dict:
    run_dir = out / f"{experiment}_seed{seed}"
    command = [
        str(Path(sys.executable).with_name("das-lab")),
        "train",
        f"+experiment={experiment}",
        f"seed={seed}",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"hydra.run.dir={run_dir}",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for experiment in EXPERIMENTS:
            results = [run(experiment, seed, args.epochs, Path(tmp)) for seed in args.seeds]
            acc = [r["final"]["test/acc1"] * 100 for r in results]
            rows.append(
                (
                    experiment,
                    acc,
                    results[0]["params"],
                    results[0]["gflops"],
                    statistics.mean(r["wall_time_s"] for r in results),
                )
            )
    print(f"| experiment | test top-1 % (seeds {args.seeds}) | mean | params | GFLOPs | time/run s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, acc, params, gflops, wall in rows:
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(
            f"| {name} | {', '.join(f'{a:.2f}' for a in acc)} | {statistics.mean(acc):.2f} +- {spread:.2f} "
            f"| {params / 1e6:.3f}M | {gflops:.4f} | {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
