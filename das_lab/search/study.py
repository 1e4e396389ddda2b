"""The study that every worker of a search shares: storage, direction, trial budget, heartbeats, retries.

Optuna's own heartbeat exists for RDB storages only; this one (a system attribute that the worker
running a trial refreshes) works the same on journal files and databases.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Sequence

from das_lab.search import SEARCH_RECORD, SearchConfigError, import_optuna

log = logging.getLogger(__name__)

HEARTBEAT_KEY = "das_lab:heartbeat"
WORKER_KEY = "das_lab:worker"
DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}


def is_url(storage: str) -> bool:
    """An RDB URL (``sqlite:///...``, ``postgresql://...``) rather than a journal file path."""
    return "://" in storage


def open_storage(storage: str) -> Any:
    """Optuna storage from a journal file path (created with its folder) or an RDB URL."""
    optuna = import_optuna()
    try:
        if is_url(storage):
            return optuna.storages.RDBStorage(storage)
        path = Path(storage).expanduser().absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    except Exception as error:  # drivers and file systems raise their own types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SearchConfigError(
            f"cannot open the search storage hydra.sweeper.storage={storage} ({type(error).__name__}: {reason}); "
            f"expected a journal file path (default: <sweep folder>/optuna.journal) or a database URL such as "
            f"sqlite:///PATH or postgresql://USER@HOST/DB whose driver is installed"
        ) from None


def study_direction(direction: str) -> str:
    """Optuna's ``maximize``/``minimize`` from das-lab's ``monitor_mode`` (``max``/``min``) or Optuna's words."""
    if direction not in DIRECTIONS:
        raise SearchConfigError(f"hydra.sweeper.direction={direction}: expected max or min (it follows monitor_mode)")
    return DIRECTIONS[direction]


def objective_direction(direction: str, monitor: Optional[str], monitor_mode: Optional[str]) -> str:
    """The study's direction, which must be ``monitor_mode``'s: a job returns the best ``monitor`` judged by it."""
    wanted = study_direction(direction)
    if monitor_mode is not None and study_direction(str(monitor_mode)) != wanted:
        raise SearchConfigError(
            f"hydra.sweeper.direction={direction} but monitor_mode={monitor_mode}: each job returns its best {monitor} "
            f"judged by monitor_mode, so the study must {study_direction(str(monitor_mode))} it; set monitor_mode "
            f"instead of hydra.sweeper.direction (which follows it)"
        )
    return wanted


def open_study(storage: Any, study_name: str, direction: str, sampler: Any, where: str) -> Any:
    """Create the study, or continue the one of that name, which must optimise in the same direction."""
    optuna = import_optuna()
    wanted = study_direction(direction)
    study = optuna.create_study(
        storage=storage, study_name=study_name, direction=wanted, sampler=sampler, load_if_exists=True
    )
    existing = [d.name.lower() for d in study.directions]
    if existing != [wanted]:
        raise SearchConfigError(
            f"study '{study_name}' in {where} was created to {' and '.join(existing)} its objective, this search "
            f"would {wanted} it (hydra.sweeper.direction, from monitor_mode): pass another "
            f"hydra.sweeper.study_name or sweep folder, or the study's own monitor_mode"
        )
    return study


def check_heartbeat(heartbeat_interval: float, grace_period: float) -> None:
    """A grace period shorter than the beat would fail trials whose workers are alive."""
    if not 0 < heartbeat_interval < grace_period:
        raise SearchConfigError(
            f"hydra.sweeper.heartbeat_interval={heartbeat_interval}, grace_period={grace_period}: expected "
            f"0 < heartbeat_interval < grace_period (e.g. 60 and 180 seconds), else live trials count as dead"
        )


def worker_name() -> str:
    """Who runs a trial: host and process id, recorded on each trial for the report."""
    return f"{socket.gethostname()}:{os.getpid()}"


def lineage(trial: Any) -> int:
    """The number of the first trial of a retry series (a trial's own number when it is no retry)."""
    return trial.system_attrs.get("failed_trial", trial.number)


def trials_to_start(study: Any, n_trials: int, n_jobs: int) -> int:
    """How many trials this worker starts now: queued retries first, then new ones up to ``n_trials`` in all.

    ``n_trials`` counts trials of the whole study, whichever worker ran them; a retry counts as the
    trial it repeats.
    """
    optuna = import_optuna()
    trials = study.get_trials(deepcopy=False)
    waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    new = max(0, n_trials - len({lineage(t) for t in trials}))
    return min(n_jobs, waiting + new)


def has_running_trials(study: Any) -> bool:
    """Whether some worker (alive or dead) still holds a trial of the study."""
    optuna = import_optuna()
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def start_trials(study: Any, storage: Any, distributions: dict[str, Any], count: int) -> list[Any]:
    """Ask the study for ``count`` trials and mark them as this worker's, alive now."""
    trials = [study.ask(distributions) for _ in range(count)]
    for trial in trials:
        storage.set_trial_system_attr(trial._trial_id, WORKER_KEY, worker_name())
        storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_KEY, time.time())
    return trials


def _last_alive(trial: Any) -> float:
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return max(float(trial.system_attrs.get(HEARTBEAT_KEY, 0.0)), started)


def fail_and_retry(study: Any, storage: Any, trial_ids: Sequence[int], max_retry: int) -> list[int]:
    """Mark trials whose job died as FAIL and queue each for another run (``max_retry`` in its series).

    When two workers race for the same trial, only the one whose FAIL lands first queues the retry.
    """
    optuna = import_optuna()
    with warnings.catch_warnings():  # experimental since Optuna 2.8, stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    failed = []
    for trial_id in trial_ids:
        try:
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        trial = storage.get_trial(trial_id)
        retry(study, trial)
        failed.append(trial.number)
    return failed


def fail_stale_trials(study: Any, storage: Any, grace_period: float, max_retry: int) -> list[int]:
    """FAIL (and retry) the running trials of workers that stopped beating ``grace_period`` seconds ago."""
    optuna = import_optuna()
    now = time.time()
    stale = [
        t._trial_id
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if now - _last_alive(t) > grace_period
    ]
    return fail_and_retry(study, storage, stale, max_retry)


def finish_trial(study: Any, trial: Any, value: Optional[float]) -> str:
    """Tell the study a trial's objective (``None``: the job failed); returns the state it got."""
    optuna = import_optuna()
    state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
    told = study.tell(trial, value, state=state, skip_if_finished=True)
    if told.state != state:
        log.warning(
            "trial %d was marked %s by another worker (no heartbeat) before it ended; its result stays in "
            "its job folder only",
            trial.number,
            told.state.name,
        )
    return told.state.name


def save_location(sweep_dir: Path, study_name: str, storage: str, objective: Optional[str], direction: str) -> None:
    """Record in the search folder where its study lives, for `das-lab report` and later workers."""
    import yaml

    if not is_url(storage):
        path = Path(storage).expanduser().absolute()
        storage = (
            str(path.relative_to(sweep_dir.absolute())) if path.is_relative_to(sweep_dir.absolute()) else str(path)
        )
    record = {
        "study_name": study_name,
        "storage": storage,
        "objective": objective,
        "direction": study_direction(direction),
    }
    (sweep_dir / SEARCH_RECORD).write_text(yaml.safe_dump(record, sort_keys=False))


def load_location(sweep_dir: Path) -> Optional[dict[str, Any]]:
    """The record that ``save_location`` wrote (storage as a URL or absolute path), or None in other sweeps."""
    import yaml

    path = sweep_dir / SEARCH_RECORD
    if not path.is_file():
        return None
    record = yaml.safe_load(path.read_text())
    if not is_url(record["storage"]):
        record["storage"] = str((sweep_dir / record["storage"]).absolute())
    return record


class Heartbeat:
    """While a batch of trials runs, refreshes their heartbeat every ``interval`` seconds from a thread."""

    def __init__(self, storage: Any, trials: Sequence[Any], interval: float) -> None:
        self.storage = storage
        self.trial_ids = [t._trial_id for t in trials]
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="das-lab-heartbeat", daemon=True)

    def _beat(self) -> None:
        optuna = import_optuna()
        while not self._stop.wait(self.interval):
            for trial_id in self.trial_ids:
                try:
                    self.storage.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self._stop.set()
        self._thread.join()
