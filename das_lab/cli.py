"""The ``das-lab`` command: pick a subcommand, hand the remaining arguments to it (each runs inside
das_lab.command's run wrapper).

Heavy libraries (torch, Lightning, W&B) are imported only by the subcommand that runs, so
``das-lab --help`` answers at once.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Sequence

from das_lab.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("das_lab.cli:train_main", "train a model (Hydra overrides, +experiment=NAME, -m for sweeps)"),
    "eval": ("das_lab.cli:eval_main", "evaluate a checkpoint: das-lab eval ckpt_path=PATH"),
    "data": (
        "das_lab.cli:data_main",
        "check a dataset, or convert it to streamed shards: das-lab data verify|convert data=NAME ...",
    ),
    "profile": ("das_lab.profile:main", "params, GFLOPs, throughput and memory of models: das-lab profile model=NAME"),
    "report": ("das_lab.report:main", "table and plots of a sweep: das-lab report multirun/DATE/TIME"),
    "visualize": (
        "das_lab.visualize:main",
        "attention maps of a checkpoint: das-lab visualize ckpt_path=PATH images=[...]",
    ),
    "export": (
        "das_lab.export:main",
        "a checkpoint as a timm folder or ONNX: das-lab export ckpt_path=PATH format=timm out=DIR",
    ),
    "predict": (
        "das_lab.predict:main",
        "label your images: das-lab predict ckpt_path=PATH|export=DIR inputs=DIR|FILE|GLOB",
    ),
}

USAGE = "usage: das-lab <command> [arguments]   (das-lab <command> --help for its options)"


def run_stamp(now: str) -> str:
    """The run folder's name: ``now`` plus the SLURM job id, or the torchrun id that all ranks share."""
    torchrun_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if torchrun_id is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torchrun_id == "none":
            raise UserError(
                "torchrun without a run id: its ranks cannot agree on a run folder; start it with "
                "--standalone or --rdzv-id=ID, or pass hydra.run.dir=DIR"
            )
        return f"torchrun-{torchrun_id}"
    slurm_job = os.environ.get("SLURM_JOB_ID")
    return f"{now}_{slurm_job}" if slurm_job else now


def _rank_overrides() -> list[str]:
    """Under torchrun only rank 0 writes Hydra's files; the others log to their own file."""
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("TORCHELASTIC_RUN_ID") is None or rank == 0:
        return []
    return ["hydra.output_subdir=null", f"hydra.job.name=rank_{rank}"]


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    from das_lab.config import config_groups_help
    from das_lab.sweeps import job_dirname

    OmegaConf.register_new_resolver("das_lab_short", job_dirname, replace=True)
    OmegaConf.register_new_resolver("das_lab_run_stamp", run_stamp, replace=True)
    OmegaConf.register_new_resolver("das_lab_config_groups", config_groups_help, replace=True)


def train_main(args: Sequence[str]) -> int:
    from das_lab.command import run_command
    from das_lab.train import train

    return run_command(train, "train", "train", args)


def eval_main(args: Sequence[str]) -> int:
    from das_lab.command import run_command
    from das_lab.evaluate import evaluate

    return run_command(evaluate, "eval", "eval", args)


DATA_USAGE = """usage: das-lab data verify [--max-images N] data=NAME data.root=PATH [overrides]
       das-lab data convert data=imagenet|stanford_dogs data.root=PATH out=DIR_OR_URL [num_workers=N]"""


def data_main(args: Sequence[str]) -> int:
    if not args or args[0] not in ("verify", "convert"):
        print(DATA_USAGE, file=sys.stderr)
        return 2
    if args[0] == "convert":
        from das_lab.data.convert import main as convert_main

        return convert_main(list(args[1:]))
    from das_lab.data.verify import main as verify_main

    return verify_main(list(args[1:]))


def _print_help() -> None:
    print(USAGE)
    print("\ncommands:")
    width = max(map(len, COMMANDS))
    for name, (_, summary) in COMMANDS.items():
        print(f"  {name:<{width}}  {summary}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``das-lab`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        _print_help()
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"das-lab: unknown command '{command}'; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[command][0].split(":")
    return getattr(importlib.import_module(module_name), func_name)(rest)


if __name__ == "__main__":
    sys.exit(main())
