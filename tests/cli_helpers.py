"""Run das-lab the way users do (its entry point, or the installed console script), on tiny settings."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

DAS_LAB = str(Path(sys.executable).with_name("das-lab"))

# digits at 32 px, one epoch of three steps: a whole run through the CLI in seconds
TINY = [
    "data.image_size=32",
    "data.digit_size=16",
    "data.num_distractors=2",
    "data.train_copies=1",
    "data.eval_copies=1",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def _environment(cwd: Path, env: dict[str, str] | None) -> dict[str, str]:
    """The environment a user's shell would give das-lab: outputs under ``cwd``, no SLURM job of the test runner."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "HYDRA_FULL_ERROR")}
    full_env.update({"DAS_LAB_LOGS": str(cwd), **(env or {})})
    return full_env


def run_console(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``das-lab ARGS`` as its own process (the installed console script), for what only a process shows:
    signals, DDP ranks, the import footprint, exit codes seen by a shell."""
    return subprocess.run(
        [DAS_LAB, *args], cwd=cwd, env=_environment(cwd, env), capture_output=True, text=True, timeout=timeout
    )


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``das-lab ARGS`` in ``cwd`` with outputs under ``cwd`` (DAS_LAB_LOGS), run in this process.

    The console script is ``sys.exit(das_lab.cli.main())``: calling ``main`` with the same command line,
    working directory, environment and ``sys.argv`` runs the same code without paying for a new
    interpreter's imports. Sweep jobs still run in their own processes (the process launcher)."""
    from das_lab.cli import main

    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(_environment(cwd, env))
    sys.argv = [DAS_LAB, *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returncode = main(args)
            except SystemExit as stop:
                returncode = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([DAS_LAB, *args], returncode, stdout.getvalue(), stderr.getvalue())


def run_dirs(root: Path) -> list[Path]:
    """Single-run folders under ``root/outputs``, oldest first."""
    return sorted(p.parent for p in (root / "outputs").glob("*/*/.hydra"))


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def error_line(main: Callable[[Sequence[str]], int], args: list[str], run_dir: Path, capsys: Any) -> str:
    """First stderr line of a command run in-process (``main``) that must refuse its input with exit code 2."""
    assert main([*args, f"hydra.run.dir={run_dir}"]) == 2
    return capsys.readouterr().err.splitlines()[0]
