"""The ``das-lab`` command: pick a subcommand, hand the remaining arguments to it.

Heavy libraries (torch, Lightning, W&B) are imported only by the subcommand that runs, so
``das-lab --help`` answers at once.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("das_lab.cli:train_main", "train a model (Hydra overrides, +experiment=NAME, -m for sweeps)"),
    "eval": ("das_lab.cli:eval_main", "evaluate a checkpoint: das-lab eval ckpt_path=PATH"),
    "data": ("das_lab.cli:data_main", "check a dataset without training: das-lab data verify data=NAME data.root=PATH"),
    "profile": ("das_lab.profile:main", "params, GFLOPs, throughput and memory of models: das-lab profile model=NAME"),
    "report": ("das_lab.report:main", "table and plots of a sweep: das-lab report multirun/DATE/TIME"),
    "visualize": ("das_lab.visualize:main", "attention maps of a checkpoint: das-lab visualize ckpt_path=PATH images=[...]"),
    "export": ("das_lab.export:main", "a checkpoint as a timm folder or ONNX: das-lab export ckpt_path=PATH format=timm out=DIR"),
    "predict": ("das_lab.predict:main", "label your images: das-lab predict ckpt_path=PATH|export=DIR inputs=DIR|FILE|GLOB"),
}

USAGE = "usage: das-lab <command> [arguments]   (das-lab <command> --help for its options)"

_failed_jobs: list[str] = []
log = logging.getLogger("das_lab")


class UserError(Exception):
    """A problem with the user's input, reported without a traceback."""


def _user_facing(error: BaseException) -> Optional[str]:
    """The message for errors that come from input (config values, files), else None.

    Such errors are reported without a traceback; a message spans several lines only when the
    lines are the point (an expected folder tree, a list of mismatched checkpoint keys).
    """
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    from das_lab.models.weights import WeightsMismatchError

    if isinstance(error, MissingMandatoryValue):
        key = getattr(error, "full_key", None) or "a required value"
        return f"missing required value '{key}': pass {key}=VALUE on the command line"
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        target = str(error).splitlines()[0]
        return f"{type(error.__cause__).__name__}: {error.__cause__} ({target.rstrip(':')})"
    if isinstance(error, (UserError, FileNotFoundError, WeightsMismatchError, ValueError, OmegaConfBaseException)):
        return str(error) or type(error).__name__
    return None


MAX_DIRNAME = 120


def short_dirname(name: str) -> str:
    """Keep sweep folder names under file-system limits: long ones end in a hash of the full name."""
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[:MAX_DIRNAME]}-{digest}"


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

    OmegaConf.register_new_resolver("das_lab_short", short_dirname, replace=True)
    OmegaConf.register_new_resolver("das_lab_run_stamp", run_stamp, replace=True)


def _guarded(task: Callable[[Any], Optional[float]]) -> Callable[[Any], Optional[float]]:
    """Report failures: one line for input errors; in a sweep, record the job and go on."""

    def run(cfg: Any) -> Optional[float]:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            return task(cfg)
        except Exception as error:
            hydra_cfg = HydraConfig.get()
            run_dir = hydra_cfg.runtime.output_dir
            message = _user_facing(error)
            if hydra_cfg.mode == RunMode.MULTIRUN:
                _failed_jobs.append(run_dir)
                log.error("job %s failed: %s (see %s/FAILED)", hydra_cfg.job.num, message or error, run_dir)
                return float("nan")
            if message is None:
                raise
            print(f"das-lab: error: {message}\n  (full traceback: {run_dir}/FAILED)", file=sys.stderr)
            sys.exit(2)

    run.__module__ = task.__module__
    run.__qualname__ = task.__qualname__
    return run


def run_hydra(task: Callable[[Any], Optional[float]], config_name: str, command: str, args: Sequence[str]) -> int:
    """Run ``task`` as a Hydra app on das-lab's configs with ``args`` as its command line.

    ``sys.argv`` stays the real command line (``das-lab train ...``): Lightning's DDP launcher
    re-runs it for the other ranks, pointing them at this run's folder.
    """
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser
    from hydra.core.utils import _flush_loggers

    from das_lab.config import config_dir
    from das_lab.sweeps import SweepFolder, failed_jobs

    _register_resolvers()
    _failed_jobs.clear()
    SweepFolder.last = None
    version.setbase("1.3")
    parser = get_args_parser()
    parser.prog = f"das-lab {command}"
    parsed = parser.parse_args([*args, *_rank_overrides()])
    _run_hydra(
        args=parsed,
        args_parser=parser,
        task_function=_guarded(task),
        config_path=str(config_dir()),
        config_name=config_name,
    )
    _flush_loggers()
    failed = set(_failed_jobs) | set(failed_jobs(SweepFolder.last) if SweepFolder.last else [])
    if failed:
        print(f"das-lab: {len(failed)} job(s) of the sweep failed:", *sorted(failed), sep="\n  ", file=sys.stderr)
        return 1
    return 0


def train_main(args: Sequence[str]) -> int:
    from das_lab.train import train

    return run_hydra(train, "train", "train", args)


def eval_main(args: Sequence[str]) -> int:
    from das_lab.evaluate import evaluate

    return run_hydra(evaluate, "eval", "eval", args)


def data_main(args: Sequence[str]) -> int:
    if not args or args[0] != "verify":
        print("usage: das-lab data verify [--max-images N] data=NAME data.root=PATH [overrides]", file=sys.stderr)
        return 2
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
