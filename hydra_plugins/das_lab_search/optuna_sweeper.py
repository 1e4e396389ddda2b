"""The Hydra sweeper behind ``hparams_search=optuna``: trials from one shared Optuna study, run by the active launcher.

Every process that runs the search command on the same storage is a worker of the same study: the
first creates it, later ones (re-runs, extra shells, cluster jobs) continue it. Hydra only accepts
sweepers defined under ``hydra_plugins``; the search logic lives in ``das_lab.search``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from das_lab.search import SearchConfigError, import_optuna
from das_lab.search.space import parse_space
from das_lab.search.study import (
    Heartbeat,
    check_heartbeat,
    fail_and_retry,
    fail_stale_trials,
    finish_trial,
    has_running_trials,
    objective_direction,
    open_storage,
    open_study,
    save_location,
    start_trials,
    trials_to_start,
)

log = logging.getLogger(__name__)


def objective(result: JobReturn) -> Optional[float]:
    """The value a job returned, or None when it failed or has no finite value (a FAIL trial)."""
    if result.status != JobStatus.COMPLETED:
        return None
    value = result.return_value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


class OptunaSearchSweeper(Sweeper):
    """Asks the study for up to ``n_jobs`` trials at a time until it holds ``n_trials``, tells it each result."""

    def __init__(
        self,
        study_name: str,
        storage: str,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: Any,
        params: Optional[DictConfig],
        heartbeat_interval: float,
        grace_period: float,
        max_retry: int,
    ) -> None:
        self.study_name = study_name
        self.storage = storage
        self.direction = direction
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler = sampler
        self.params = params or {}
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_retry = max_retry

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def _subdir_override(self, number: int) -> str:
        """Job folders named after trial numbers, which stay unique across workers and re-runs."""
        pattern = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)["subdir"]
        return f"hydra.sweep.subdir='{pattern.replace('${hydra.job.num}', str(number))}'"

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        try:
            return self._search(arguments)
        except SearchConfigError as error:  # bad input: one line, like every das-lab command
            print(f"das-lab: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    def _search(self, arguments: list[str]) -> list[JobReturn]:
        import_optuna()
        check_heartbeat(self.heartbeat_interval, self.grace_period)
        objective_direction(self.direction, self.config.get("monitor"), self.config.get("monitor_mode"))
        space = parse_space(self.params, arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(self.storage)
        study = open_study(storage, self.study_name, self.direction, instantiate(self.sampler), self.storage)
        save_location(sweep_dir, self.study_name, self.storage, self.config.get("monitor"), self.direction)
        log.info(
            "search: study '%s' in %s, %d trial(s) so far, %d in all. To add a worker or continue later, "
            "run the same command with hydra.sweep.dir=%s",
            self.study_name,
            self.storage,
            len(study.trials),
            self.n_trials,
            sweep_dir,
        )
        returns: list[JobReturn] = []
        while True:
            for number in fail_stale_trials(study, storage, self.grace_period, self.max_retry):
                log.warning(
                    "trial %d: its worker stopped beating for %ss (killed, preempted): FAIL, queued again",
                    number,
                    self.grace_period,
                )
            count = trials_to_start(study, self.n_trials, self.n_jobs)
            if count == 0:
                if not has_running_trials(study):
                    break
                time.sleep(self.heartbeat_interval)  # other workers' trials: wait, and retry them if they die
                continue
            returns += self._run_batch(study, storage, space, count)
        self._log_best(study)
        return returns

    def _run_batch(self, study: Any, storage: Any, space: Any, count: int) -> list[JobReturn]:
        trials = start_trials(study, storage, space.distributions, count)
        batch = [[*space.overrides(t.params), self._subdir_override(t.number)] for t in trials]
        try:
            self.validate_batch_is_legal(batch)
        except Exception:
            for trial in trials:
                finish_trial(study, trial, None)
            raise
        with Heartbeat(storage, trials, self.heartbeat_interval):
            try:
                results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            except Exception as error:  # the launcher lost its jobs (killed, cancelled): no results to tell
                failed = fail_and_retry(study, storage, [t._trial_id for t in trials], self.max_retry)
                log.error(
                    "trial(s) %s: their jobs died (%s: %s): FAIL, queued again", failed, type(error).__name__, error
                )
                return []
        for trial, result in zip(trials, results):
            state = finish_trial(study, trial, objective(result))
            log.info("trial %d: %s %s", trial.number, state, trial.params)
        return list(results)

    def _log_best(self, study: Any) -> None:
        optuna = import_optuna()
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            log.warning("search: no completed trial in study '%s' yet", self.study_name)
            return
        best = study.best_trial
        log.info("search: best trial %d, value %s, params %s", best.number, best.value, best.params)
