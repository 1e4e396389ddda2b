"""How fast das-lab answers: ``das-lab --help`` (target < 2 s, no torch/lightning/wandb import) and
the time from launching ``das-lab train`` (tiny digits run) to its first training step.

Usage: python benchmarks/cli_startup.py [--repeats 5] [--train-repeats 2]
The first training step is stamped by a callback added with a Hydra override
(``+callbacks.first_step._target_=cli_startup.FirstStepStamp``); times are medians of fresh
processes, measured from just before the process is launched.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from cli_helpers import DAS_LAB, TINY  # noqa: E402  (the tests' tiny run settings)

HEAVY = ("torch", "lightning", "wandb", "hydra", "timm", "torchvision")
STAMP = "das-lab-first-step-at"


class FirstStepStamp(Callback):
    """Prints the wall-clock time when the first training batch starts."""

    def __init__(self) -> None:
        self.seen = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.seen:
            self.seen = True
            print(f"{STAMP} {time.time():.6f}", flush=True)


def help_seconds(repeats: int) -> list[float]:
    """Wall time of ``das-lab --help`` in fresh processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([DAS_LAB, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def help_imports() -> tuple[float, list[str]]:
    """Import time of das_lab.cli (s) and which heavy packages ``--help`` imports (``-X importtime``)."""
    code = "import sys; from das_lab.cli import main; main(['--help'])"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], check=True, capture_output=True, text=True
    )
    imported = set()
    cli_us = 0
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)", line)
        if not match:
            continue
        cumulative, name = int(match.group(1)), match.group(3)
        imported.add(name.split(".")[0])
        if name == "das_lab.cli":
            cli_us = cumulative
    return cli_us / 1e6, sorted(set(HEAVY) & imported)


def first_step_seconds(repeats: int) -> list[tuple[float, float]]:
    """(seconds to the first training step, seconds for the whole run) of a tiny ``das-lab train``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
    }
    args = [DAS_LAB, "train", *TINY, "+callbacks.first_step._target_=cli_startup.FirstStepStamp"]
    results = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.time()
            run = subprocess.run(args, cwd=tmp, env={**env, "DAS_LAB_LOGS": tmp}, capture_output=True, text=True)
            total = time.time() - start
        match = re.search(rf"{STAMP} (\d+\.\d+)", run.stdout)
        if run.returncode or not match:
            raise RuntimeError(f"das-lab train failed or printed no first-step stamp:\n{run.stderr[-2000:]}")
        results.append((float(match.group(1)) - start, total))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="das-lab --help launches")
    parser.add_argument("--train-repeats", type=int, default=2, help="das-lab train launches")
    args = parser.parse_args()
    helps = help_seconds(args.repeats)
    cli_import, heavy = help_imports()
    print(
        f"das-lab --help: median {statistics.median(helps):.2f} s (min {min(helps):.2f}, max {max(helps):.2f}, "
        f"{args.repeats} runs); import das_lab.cli {cli_import * 1000:.0f} ms; "
        f"heavy packages imported: {', '.join(heavy) or 'none'}",
        flush=True,
    )
    runs = first_step_seconds(args.train_repeats)
    first = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    print(
        f"das-lab train (tests' TINY digits run): first training step after {first:.1f} s, "
        f"whole run {total:.1f} s (median of {args.train_repeats})"
    )


if __name__ == "__main__":
    main()
