"""``das-lab report --wandb``: a sweep's report table, seed summary and plots as one W&B run in the sweep's group."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Optional, Sequence

from das_lab.loggers import offline_reason, sweep_group
from das_lab.report import SEED_KEY, _mean_std, find_jobs, primary_metric, seed_groups, swept_keys

log = logging.getLogger(__name__)


def _cell(value: str) -> Optional[float | str]:
    """report.csv cells as W&B values: numbers as floats, empty cells as missing."""
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return value


def log_report(folders: Sequence[Path], out_dir: Path, project: str, offline: Optional[bool] = None) -> Path:
    """Log ``out_dir``'s report.csv (raw values), mean ± std over seeds and PNGs; returns the W&B run folder."""
    import wandb

    with (out_dir / "report.csv").open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    payload: dict = {"sweep_table": wandb.Table(columns=header, data=[[_cell(c) for c in row] for row in rows])}
    jobs = find_jobs(folders)
    keys = swept_keys(jobs)
    metric = primary_metric(jobs)
    if metric and SEED_KEY in keys:
        pooled = [key for key in keys if key != SEED_KEY]
        groups = seed_groups(jobs, pooled, metric)
        payload["seed_table"] = wandb.Table(
            columns=[*pooled, f"best {metric} mean", f"best {metric} std", "seeds"],
            data=[[*setting, *_mean_std(values), len(values)] for setting, values in groups.items()],
        )
    payload.update({plot.stem: wandb.Image(str(plot)) for plot in sorted(out_dir.glob("*.png"))})
    reason = offline_reason(offline)
    if reason is not None:
        log.info("W&B logs offline: %s", reason)
    run = wandb.init(
        project=project,
        group=sweep_group(str(folders[0])),
        job_type="report",
        name="report",
        dir=str(out_dir),
        mode="offline" if reason is not None else "online",
        config={"sweeps": [str(f) for f in folders]},
    )
    try:
        run.log(payload)
    finally:
        run.finish()
    return Path(run.dir).parent
