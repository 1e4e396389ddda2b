"""What a run folder records: metrics.json, a FAILED marker, and how to reproduce the run."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from das_lab.atomic_io import write_text_atomic
from das_lab.tasks.base import MetricSpec, records_of

PACKAGES = ("das-lab", "torch", "torchvision", "lightning", "timm", "torchmetrics", "hydra-core", "omegaconf", "wandb")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file so a crash never leaves a half-written file."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


class MetricHistory(Callback):
    """Keeps each validation epoch's ``val/*`` metrics so metrics.json can report the best of each.

    Which value is best comes from the task's declarations (``declared``: logged name -> MetricSpec,
    the monitored metric already set to ``monitor_mode``); a ``val/`` metric the task does not declare
    stops the run at its first validation (the sanity check, when there is one). Its state travels
    in checkpoints, so a resumed run still reports the best over all epochs.
    """

    def __init__(self, declared: Mapping[str, MetricSpec], owner: str) -> None:
        self.declared = dict(declared)
        self.owner = owner
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and not k.endswith(("_step", "_epoch"))
        }
        undeclared = sorted(set(values) - set(self.declared))
        if undeclared:
            raise ValueError(
                f"{', '.join(undeclared)} logged but not declared by {self.owner}: add a MetricSpec for "
                f"{'each' if len(undeclared) > 1 else 'it'} to {self.owner}.metric_specs (das_lab/tasks/base.py)"
            )
        if values and not trainer.sanity_checking:
            self.epochs.append(values)

    def best(self) -> dict[str, Optional[float]]:
        """Best value of every metric over the epochs, in its declared direction.

        NaN (undefined, e.g. the AP of an empty size range) never wins; a metric undefined in
        every epoch is None (null in metrics.json).
        """
        best: dict[str, Optional[float]] = {}
        for epoch in self.epochs:
            for name, value in epoch.items():
                if math.isnan(value):
                    best.setdefault(name, None)
                else:
                    previous = best.get(name)
                    best[name] = value if previous is None else self.declared[name].better(previous, value)
        return best

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict["epochs"])


def _git(args: list[str], cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def environment_info() -> tuple[dict[str, Any], Optional[str]]:
    """Versions, devices and (from a checkout) the git commit; second item: the uncommitted diff."""
    import torch

    info: dict[str, Any] = {
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": {},
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git": None,
    }
    for name in PACKAGES:
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["packages"][name] = None
    source = Path(__file__).resolve().parent.parent
    diff = None
    if (source / ".git").exists():
        commit = _git(["rev-parse", "HEAD"], source)
        diff = _git(["diff", "HEAD"], source)
        info["git"] = {"commit": commit.strip() if commit else None, "dirty": bool(diff)}
    return info, diff or None


class RunRecord:
    """Writes a run folder's records; every path and file name users rely on is defined here."""

    def __init__(self, run_dir: Path, overrides: list[str]) -> None:
        self.run_dir = run_dir
        self.overrides = list(overrides)
        self.started = time.monotonic()
        self.params: Optional[int] = None
        self.gflops: Optional[float] = None
        # logged name -> the task's declaration; metrics.json records those of the metrics it holds
        self.declared: dict[str, MetricSpec] = {}
        previous = self.previous()
        # SLURM restarts a requeued job in its folder: wall time counts every attempt
        self.earlier_s = float(previous.get("wall_time_s") or 0.0) if previous.get("status") == "requeued" else 0.0

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.json"

    @property
    def failed_path(self) -> Path:
        return self.run_dir / "FAILED"

    def previous(self) -> dict[str, Any]:
        """The folder's metrics.json as an earlier attempt or command left it ({} when there is none)."""
        try:
            return json.loads(self.metrics_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write_environment(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        info, diff = environment_info()
        write_json_atomic(self.run_dir / "run_info.json", info)
        if diff:
            (self.run_dir / "git.diff").write_text(diff)

    def _payload(self, status: str, final: dict[str, float], best: dict[str, float], ckpt_best: Optional[str]) -> dict:
        return {
            "status": status,
            "final": final,
            "best": best,
            "params": self.params,
            "gflops": self.gflops,
            "overrides": self.overrides,
            "wall_time_s": round(self.earlier_s + time.monotonic() - self.started, 3),
            "ckpt_best": ckpt_best,
            "metrics": records_of(self.declared, [*final, *(key for key in best if key not in final)]),
        }

    def completed(self, final: dict[str, float], best: dict[str, float], ckpt_best: Optional[str]) -> None:
        self.failed_path.unlink(missing_ok=True)
        write_json_atomic(self.metrics_path, self._payload("completed", final, best, ckpt_best))

    def failed(
        self, error: BaseException, best: Optional[dict[str, float]] = None, extra: Optional[dict[str, Any]] = None
    ) -> None:
        """Leave the traceback in ``FAILED`` and a metrics.json that says so, keeping what was measured.

        A SLURM job that asked to be requeued has not failed: it is recorded as ``requeued``.
        """
        from das_lab.slurm import requeue_requested

        if requeue_requested():
            self.requeued(best)
            return
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.failed_path, text)
        payload = self._payload("failed", {}, best or {}, None)
        payload["error"] = f"{type(error).__name__}: {error}"
        payload.update(extra or {})
        write_json_atomic(self.metrics_path, payload)

    def requeued(self, best: Optional[dict[str, float]] = None) -> None:
        """A SLURM job waiting to restart (preempted or out of time): it resumes from its last checkpoint."""
        self.failed_path.unlink(missing_ok=True)
        write_json_atomic(self.metrics_path, self._payload("requeued", {}, best or {}, None))

    def interrupted(self, signal_name: str, best: Optional[dict[str, float]] = None) -> None:
        """metrics.json ``interrupted`` (SIGINT/SIGTERM), keeping what was measured; no FAILED: nothing broke."""
        from das_lab.slurm import requeue_requested

        if requeue_requested():
            self.requeued(best)
            return
        payload = self._payload("interrupted", {}, best or {}, None)
        payload["error"] = f"interrupted by {signal_name}"
        write_json_atomic(self.metrics_path, payload)
