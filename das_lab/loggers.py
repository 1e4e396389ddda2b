"""Experiment loggers beyond Lightning's defaults: W&B that names, groups and closes its runs by itself;
CSV and TensorBoard logs that a resumed run continues instead of replacing."""

from __future__ import annotations

import csv
import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"
SUMMARY_KEYS = ("params", "gflops")
_OFFLINE_MODES = ("offline", "dryrun")


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)


def _has_netrc_key(host: str) -> bool:
    """True when ``wandb login`` stored a key for ``host`` in ~/.netrc (or $NETRC)."""
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(url: str, timeout_s: float = 2.0) -> bool:
    """A TCP connection to the W&B server succeeds within ``timeout_s``, so ``wandb.init`` cannot hang."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def offline_reason(offline: Optional[bool]) -> Optional[str]:
    """Why this run must log offline (None: it can go online); decided once, before ``wandb.init``."""
    if offline:
        return "logger.wandb.offline=true"
    if os.environ.get("WANDB_MODE", "").lower() in _OFFLINE_MODES:
        return f"WANDB_MODE={os.environ['WANDB_MODE']}"
    if offline is None:
        host = urlparse(_base_url()).hostname or ""
        if not os.environ.get("WANDB_API_KEY") and not _has_netrc_key(host):
            return "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
        if not _reachable(_base_url()):
            return f"{_base_url()} is not reachable"
    return None


def sweep_group(sweep_dir: str) -> str:
    """W&B group of a multirun: ``multirun-<date>-<time>`` from ``multirun/<date>/<time>``, else the folder name."""
    parts = Path(sweep_dir).parts
    if len(parts) >= 3 and parts[-3] == "multirun":
        return "-".join(parts[-3:])
    return Path(sweep_dir).name


def _hydra_names() -> tuple[Optional[str], Optional[str]]:
    """(group, name) for this Hydra job: the sweep folder for multiruns, the job's overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    group = sweep_group(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    return group, hydra_cfg.job.override_dirname or "default"


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger that names and groups runs after the Hydra job and never blocks offline.

    ``group=None`` groups the jobs of one sweep under the sweep folder's name (``multirun-DATE-TIME``);
    ``name=None`` names the run after the job's overrides (``default`` without any). ``id`` continues
    an existing run (a resumed training sets it from its checkpoint). ``offline=None``
    logs online only when an API key is known and the server answers, else offline (sync the run
    folder later with ``wandb sync``). ``params``/``gflops`` given to ``log_hyperparams`` also go to
    the run summary, so they appear as table columns in the W&B UI.
    """

    def __init__(
        self,
        project: str,
        save_dir: str,
        entity: Optional[str] = None,
        group: Optional[str] = None,
        name: Optional[str] = None,
        tags: Optional[Sequence[str]] = None,
        job_type: Optional[str] = None,
        notes: Optional[str] = None,
        log_model: bool = False,
        offline: Optional[bool] = None,
        id: Optional[str] = None,
    ) -> None:
        hydra_group, hydra_name = _hydra_names()
        reason = offline_reason(offline)
        if reason is not None:
            log.info("W&B logs offline: %s", reason)
            if log_model:
                log.warning("logger.wandb.log_model=true needs an online run; checkpoints are not uploaded")
                log_model = False
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            name=name or hydra_name,
            save_dir=save_dir,
            project=project,
            log_model=log_model,
            # per run: Lightning's own offline flag would set WANDB_MODE for the whole process
            mode="offline" if reason is not None else None,
            entity=entity,
            group=group or hydra_group,
            tags=list(tags or []),
            job_type=job_type,
            notes=notes,
            id=id,
        )

    @property
    def experiment(self) -> Any:
        """The W&B run; a run left open by an earlier job in this process is finished first, never reused."""
        import wandb

        if self._experiment is None and wandb.run is not None:
            log.warning("finishing W&B run %s left open by a previous job", wandb.run.id)
            wandb.run.finish()
        run = super().experiment
        if isinstance(run, wandb.Run) and getattr(self, "_announced", None) != run.id:
            self._announced = run.id
            if run.settings.mode in _OFFLINE_MODES:
                log.info("W&B offline run in %s; upload it later with: wandb sync %s", run.dir, Path(run.dir).parent)
        return run

    def log_hyperparams(self, params: Mapping[str, Any] | Any, *args: Any, **kwargs: Any) -> None:
        super().log_hyperparams(params, *args, **kwargs)
        if isinstance(params, Mapping):
            summary = {key: params[key] for key in SUMMARY_KEYS if params.get(key) is not None}
            if summary:
                self.experiment.summary.update(summary)


def close_loggers(
    loggers: Sequence[Logger], failed: bool, best: Optional[Mapping[str, Optional[float]]] = None
) -> None:
    """Finish every W&B run of a job (exit code 1 when it failed) so the next job of a sweep starts its own.

    ``best`` (metrics.json's best values) goes to each run's summary as ``best/<metric>``, so W&B's run
    table shows the best epoch, not only the last; undefined (None) values are left out.
    """
    for logger in loggers:
        run = getattr(logger, "_experiment", None) if isinstance(logger, LightningWandbLogger) else None
        if run is None:
            continue
        summary = {f"best/{name}": value for name, value in (best or {}).items() if value is not None}
        if summary:
            run.summary.update(summary)
        run.finish(exit_code=1 if failed else 0)
        logger._experiment = None


WANDB_ID_KEY = "das_lab_wandb_run_id"


class WandbIdInCheckpoint(Callback):
    """Stores the W&B run id in checkpoints, so a resumed run continues the same dashboard curves."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = [logger for logger in loggers if isinstance(logger, LightningWandbLogger)]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.loggers:
            checkpoint[WANDB_ID_KEY] = self.loggers[0].version


def with_resumed_wandb_id(
    logger_cfg: Optional[DictConfig], checkpoint: Optional[Mapping[str, Any]]
) -> Optional[DictConfig]:
    """The logger config with the checkpoint's W&B run id filled in where ``logger.wandb.id`` is unset."""
    run_id = (checkpoint or {}).get(WANDB_ID_KEY)
    if logger_cfg is None or run_id is None or logger_cfg.get("wandb") is None or logger_cfg.wandb.get("id"):
        return logger_cfg
    logger_cfg = logger_cfg.copy()
    logger_cfg.wandb.id = run_id
    log.info("resuming W&B run %s", run_id)
    return logger_cfg


class _ContinuedCSVWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps an earlier attempt's metrics.csv (Lightning deletes it).

    Rows from the first step this attempt logs onwards were logged after the checkpoint it resumed
    from: the new attempt repeats those steps, so its rows replace them.
    """

    def _check_log_dir_exists(self) -> None:
        self._earlier_rows: Optional[list[dict[str, str]]] = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                self._earlier_rows = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def log_metrics(self, metrics_dict: dict[str, float], step: Optional[int] = None) -> None:
        if self._earlier_rows is not None and step is not None:
            kept = [row for row in self._earlier_rows if float(row["step"]) < step]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._earlier_rows = None
        super().log_metrics(metrics_dict, step)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger whose metrics.csv spans every attempt of a resumed run (``ckpt_path=last|auto``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedCSVWriter(log_dir=self.log_dir)
        return self._experiment
