"""hydra-submitit's launchers with das-lab's job records (the logic lives in :mod:`das_lab.slurm`).

A job that SLURM ends before it can report (scancel, out of memory, node failure, requeues used up) is
recorded as failed with SLURM's state, and the sweep ends with das-lab's summary instead of a traceback.
Inside a job: the record shows the das-lab command the job runs, ranks other than 0 log to their own
file, and every rank leaves at once when the job is requeued.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict


class _DasLabJobs:
    """What das-lab adds to hydra-submitit's launchers, in the launching process and in each job."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: Any
    hydra_context: Any

    def __call__(self, sweep_overrides: list[str], *args: Any) -> JobReturn:
        from das_lab import slurm

        slurm.leave_promptly_on_requeue()
        sys.argv = slurm.job_command(self.launch_argv, sweep_overrides)
        job_return = super().__call__([*sweep_overrides, *slurm.rank_overrides()], *args)  # type: ignore[misc]
        slurm.exit_if_requeued()
        return job_return

    def _executor(self) -> Any:
        """A submitit executor with this launcher's parameters; launcher-only keys keep submitit's names."""
        import submitit

        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        executor.update_parameters(
            **{
                key if key in shared else f"{self._EXECUTOR}_{key}": value
                for key, value in self.params.items()
                if key not in ("submitit_folder", "max_num_timeout")
            }
        )
        return executor

    def _job_dir(self, overrides: Sequence[str], num: int) -> Path:
        """The run folder that job ``num`` writes to, computed as Hydra does inside the job."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config.hydra.job):
            config.hydra.job.num = num
        return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from das_lab import slurm

        self.launch_argv = list(sys.argv)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        nums = range(initial_job_idx, initial_job_idx + len(job_overrides))
        for num, overrides in zip(nums, job_overrides):
            submitit_launcher.log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        jobs = self._executor().map_array(
            self,
            [list(o) for o in job_overrides],
            ["hydra.sweep.dir"] * len(nums),
            list(nums),
            [f"job_id_for_{num}" for num in nums],
            [state] * len(nums),
        )
        submitit_launcher.log.info(
            f"Submitit '{self._EXECUTOR}' jobs {', '.join(j.job_id for j in jobs)} write to {sweep_dir}"
        )

        def nan_return(overrides: Sequence[str], value: float) -> JobReturn:
            return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value)

        job_dirs = [self._job_dir(overrides, num) for num, overrides in zip(nums, job_overrides)]
        return slurm.collect_results(jobs, job_dirs, job_overrides, nan_return)


class SlurmLauncher(_DasLabJobs, submitit_launcher.SlurmLauncher):
    """hydra/launcher=slurm: jobs on a SLURM cluster."""


class LocalLauncher(_DasLabJobs, submitit_launcher.LocalLauncher):
    """hydra/launcher=slurm_local: the same job layout run by submitit on this machine."""
