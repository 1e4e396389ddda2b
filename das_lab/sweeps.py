"""Sweep helpers that configs instantiate: the sweep folder and its failed jobs."""

from __future__ import annotations

from pathlib import Path
import json
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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
