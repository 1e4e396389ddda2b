"""Sweep helpers that configs instantiate: the sweep folder, its failed jobs, job folder names."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

MAX_DIRNAME = 120
# the keys a sweep varies, handed by the launching process to its jobs (which inherit its environment)
SWEPT_KEYS_ENV = "DAS_LAB_SWEPT_KEYS"


def swept_keys(config: DictConfig) -> list[str]:
    """Keys whose value changes from job to job: sweeps on the command line and ``hydra.sweeper.params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    swept = {override.key_or_group for override in overrides if override.is_sweep_override()}
    return sorted(swept | set(config.hydra.sweeper.get("params") or {}))


def job_dirname(override_dirname: str) -> str:
    """A sweep job's folder name that shows what differs: the swept ``key=value`` first, then the other
    overrides by their last key component; a name longer than MAX_DIRNAME is cut and ends in a hash of
    the full name, so that it stays unique."""
    swept = set(filter(None, os.environ.get(SWEPT_KEYS_ENV, "").split(",")))
    items = re.split(r",(?=[^,=]+=)", override_dirname) if override_dirname else []
    keys = [item.split("=", 1)[0].lstrip("+~") for item in items]
    first = [item for item, key in zip(items, keys) if key in swept]
    rest = [
        item.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + item.split("=", 1)[1] if "=" in item else item
        for item, key in zip(items, keys)
        if key not in swept
    ]
    name = ",".join(first + rest)
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    return f"{name[: MAX_DIRNAME - len(digest) - 1]}-{digest}"


class SweepFolder(Callback):
    """Remembers, in the launching process, the folder of the sweep that runs, and tells its jobs which
    keys it sweeps (their folder names start with those).

    Jobs may run elsewhere (submitit, SLURM), so the launching process learns which failed from
    their metrics.json files rather than from its own memory.
    """

    last: Optional[Path] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepFolder.last = Path(config.hydra.sweep.dir)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(config))


def failed_jobs(sweep_dir: Path) -> list[str]:
    """Absolute job folders of a sweep whose metrics.json says ``failed`` (as Hydra names a job's folder)."""
    failed = []
    for metrics in sorted(sweep_dir.glob("*/metrics.json")):
        try:
            status = json.loads(metrics.read_text()).get("status")
        except (OSError, json.JSONDecodeError):
            continue
        if status == "failed":
            failed.append(os.path.abspath(metrics.parent))
    return failed
