"""Sweep helpers that configs instantiate: Optuna storage and trial outcomes, the sweep folder."""

from __future__ import annotations

import logging
import math
from pathlib import Path
import json
from typing import Any, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def sqlite_storage(path: str) -> str:
    """SQLAlchemy URL of an SQLite file, creating its folder (the sweep folder does not exist before the first job)."""
    file = Path(path).expanduser().absolute()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


class NanObjectiveFailsTrial(Callback):
    """Turns a NaN objective (a failed or diverged job) into no value, which the Optuna sweeper records as FAIL.

    hydra-optuna-sweeper hands a NaN to ``study.tell`` as a completed value; Optuna rejects it and
    the search ends with the trial left RUNNING. Without a value the sweeper marks the trial failed
    and continues.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.COMPLETED:
            return
        value = job_return.return_value
        if isinstance(value, float) and math.isnan(value):
            log.warning("job %s has no objective value (NaN): its Optuna trial is recorded as failed",
                        config.hydra.job.get("num"))
            job_return.return_value = None


class SweepFolder(Callback):
    """Remembers, in the launching process, the folder of the sweep that runs.

    Jobs may run elsewhere (submitit, SLURM), so the launching process learns which failed from
    their metrics.json files rather than from its own memory.
    """

    last: Optional[Path] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepFolder.last = Path(config.hydra.sweep.dir)


def failed_jobs(sweep_dir: Path) -> list[str]:
    """Job folders of a sweep whose metrics.json says ``failed``."""
    failed = []
    for metrics in sorted(sweep_dir.glob("*/metrics.json")):
        try:
            status = json.loads(metrics.read_text()).get("status")
        except (OSError, json.JSONDecodeError):
            continue
        if status == "failed":
            failed.append(str(metrics.parent))
    return failed
