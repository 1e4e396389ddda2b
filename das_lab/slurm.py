"""Sweeps through submitit (SLURM or local): each job's command, log file and requeue, and the records of
jobs that SLURM ended before das-lab could write them (cancelled, out of memory, node failure).

The launcher classes that Hydra loads live in ``hydra_plugins.das_lab_launchers``; the logic is here.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

_requeue_requested = False


class SlurmJobEnded(Exception):
    """SLURM ended a job before it could report (its state: CANCELLED, OUT_OF_MEMORY, NODE_FAIL, ...)."""


def requeue_requested() -> bool:
    """True once this job has asked SLURM to requeue it: its run is waiting to be resumed, not failed."""
    return _requeue_requested


def _global_rank() -> int:
    """This task's rank in its submitit job (SLURM or local executor)."""
    import submitit

    return submitit.JobEnvironment().global_rank


def leave_promptly_on_requeue() -> None:
    """Wrap submitit's handler of the requeue signal: remember that the job was requeued, and make every
    rank leave its training at once, not only rank 0 (the others would wait in a collective for a peer
    that has gone, until SLURM kills them)."""
    import submitit

    requeue_signal = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")  # USR2 unless SUBMITIT_PREEMPT_SIGNAL
    submitit_handler = signal.getsignal(requeue_signal)
    if not callable(submitit_handler):
        return

    def handler(signum: int, frame: Any) -> None:
        global _requeue_requested
        try:
            submitit_handler(signum, frame)
        except SystemExit:  # rank 0: submitit requeued the job and leaves
            _requeue_requested = True
            raise
        if _global_rank() != 0:
            _requeue_requested = True
            log.info("rank %d leaves: rank 0 requeues the job", _global_rank())
            sys.exit(-1)

    signal.signal(requeue_signal, handler)


def exit_if_requeued() -> None:
    """A requeued job leaves without a result, whatever its training raised on the way out (a peer rank's
    closed connection): submitit would take a result as the job's end, though SLURM runs it again."""
    if _requeue_requested:
        raise SystemExit(-1)


def job_command(launch_argv: Sequence[str], job_overrides: Sequence[str]) -> list[str]:
    """The das-lab command line that runs one job of a sweep by itself (``das-lab train k=v ...``)."""
    return [*launch_argv[:2], *job_overrides]


def rank_overrides() -> list[str]:
    """Ranks other than 0 of a multi-task job log to ``rank_<n>.log`` and leave Hydra's files to rank 0."""
    rank = _global_rank()
    return [] if rank == 0 else ["hydra.output_subdir=null", f"hydra.job.name=rank_{rank}"]


def record_ended_job(run_dir: Path, overrides: Sequence[str], job_id: str, state: str, log_path: Path) -> None:
    """Record a job that SLURM ended as failed, with SLURM's state, keeping what its attempts measured
    and the traceback it may have left."""
    from das_lab.run import RunRecord

    record = RunRecord(run_dir, list(overrides))
    previous = record.previous()
    if previous.get("status") == "completed":
        return
    record.earlier_s = float(previous.get("wall_time_s") or 0.0)
    record.params, record.gflops = previous.get("params"), previous.get("gflops")
    own_traceback = record.failed_path.read_text() if record.failed_path.is_file() else ""
    error = SlurmJobEnded(f"SLURM ended job {job_id} with state {state} (its log: {log_path})")
    record.failed(error, previous.get("best"), extra={"slurm_state": state})
    if own_traceback:
        with record.failed_path.open("a") as failed:
            failed.write(f"\nThe job's own record before SLURM ended it:\n{own_traceback}")


def _slurm_state(job: Any) -> str:
    state = str(getattr(job, "state", "UNKNOWN"))
    return state.split()[0] if state else "UNKNOWN"


def collect_results(
    jobs: Sequence[Any],
    job_dirs: Sequence[Path],
    job_overrides: Sequence[Sequence[str]],
    make_return: Callable[[Sequence[str], float], Any],
) -> list[Any]:
    """Wait for every job; one that ended without a result (cancelled, killed) is recorded as failed and
    returns NaN, like a job that failed by itself, so the sweep goes on to its summary."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    returns = []
    for job, run_dir, overrides in zip(jobs, job_dirs, job_overrides):
        try:
            returns.append(job.results()[0])
        except (UncompletedJobError, FailedJobError):
            state = _slurm_state(job)
            log.error("job %s ended with SLURM state %s without a result (see %s/FAILED)", job.job_id, state, run_dir)
            record_ended_job(run_dir, overrides, job.job_id, state, job.paths.stderr)
            returns.append(make_return(overrides, math.nan))
    return returns
