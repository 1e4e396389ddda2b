"""Local sweeps (``-m``) with every job in its own process, one after another.

A job that dies hard (a segfault in a native kernel, ``kill -9``, the out-of-memory killer) cannot
report its own failure; here the sweep's process records it (metrics.json ``failed`` with the
signal, FAILED), tells the sweeper the job has no objective (NaN), and goes on with the next job.
"""

from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class ProcessLauncher(Launcher):
    """Hydra launcher (``hydra/launcher=process``, das-lab's default) running each job in a child process."""

    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs, each in its own process", len(job_overrides))
        return [self._launch(list(overrides), initial_job_idx + i) for i, overrides in enumerate(job_overrides)]

    def _launch(self, overrides: list[str], num: int) -> JobReturn:
        assert self.config is not None and self.hydra_context is not None
        log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = num
            sweep_config.hydra.job.num = num
        with tempfile.TemporaryDirectory(prefix="das-lab-job-") as scratch:
            job_file, result_file = Path(scratch) / "job.pkl", Path(scratch) / "result.pkl"
            job_file.write_bytes(
                cloudpickle.dumps((self.hydra_context, self.task_function, sweep_config, Singleton.get_state()))
            )
            process = subprocess.Popen([sys.executable, "-m", __name__, str(job_file), str(result_file)])
            returncode, stop = _wait(process)
            result = cloudpickle.loads(result_file.read_bytes()) if result_file.is_file() else None
        if stop is not None and (result is None or result.status == JobStatus.COMPLETED):
            from das_lab.command import Interrupted

            raise Interrupted(stop, f"the sweep stopped at job #{num}; its folder: {self.config.hydra.sweep.dir}")
        if result is not None:
            return result
        return self._dead(sweep_config, overrides, returncode)

    def _dead(self, sweep_config: DictConfig, overrides: list[str], returncode: int) -> JobReturn:
        """A job that died without a result: record it as failed; its objective is NaN, the sweep goes on."""
        from das_lab.command import record_dead_job

        assert self.hydra_context is not None
        HydraConfig.instance().set_config(sweep_config)
        job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        why = record_dead_job(job_dir.absolute(), overrides, returncode)
        log.error("job %s failed: %s (see %s/FAILED)", sweep_config.hydra.job.num, why, job_dir)
        task_cfg = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        job = JobReturn(
            overrides=overrides,
            cfg=task_cfg,
            hydra_cfg=sweep_config,
            working_dir=str(Path.cwd()),
            task_name=str(sweep_config.hydra.job.name),
            status=JobStatus.COMPLETED,
        )
        job.return_value = math.nan
        self.hydra_context.callbacks.on_job_end(config=sweep_config, job_return=job)
        return job


def _wait(process: subprocess.Popen) -> tuple[int, Optional[signal.Signals]]:
    """The job's exit status, and the signal that asked the sweep to stop while it ran (if any).

    SIGTERM to the sweep is passed on to the job; Ctrl-C reaches the job by itself (same process
    group). Either way the job is left to write its ``interrupted`` record before the sweep stops.
    """
    stop: Optional[signal.Signals] = None

    def forward(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = signal.Signals(signum)
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return process.wait(), stop
            except KeyboardInterrupt:
                stop = signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_job_file(job_file: Path, result_file: Path) -> None:
    """In the child process: run one pickled sweep job as Hydra's basic launcher would, save its JobReturn."""
    from hydra import version

    from das_lab.cli import _register_resolvers
    from das_lab.command import Stop, report_error

    hydra_context, task_function, sweep_config, singleton_state = cloudpickle.loads(job_file.read_bytes())
    Singleton.set_state(singleton_state)
    version.setbase("1.3")
    setup_globals()
    _register_resolvers()
    try:
        result = run_job(
            hydra_context=hydra_context,
            task_function=task_function,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except Stop as stop:  # an interruption: the job has recorded it; the sweep learns from the exit status
        sys.exit(report_error(stop.error))
    result_file.write_bytes(cloudpickle.dumps(result))


if __name__ == "__main__":
    run_job_file(Path(sys.argv[1]), Path(sys.argv[2]))
