"""``das-lab report``: one table (markdown, CSV) and plots of the jobs of one or more sweeps."""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from das_lab.tasks.base import Declarations, MetricSpec, declarations_from_record, metric_declarations, task_metrics
from das_lab.utils.tables import markdown_table, write_csv

# whose declarations judge and show the metrics of a run that recorded none and names no task
BUILTIN_TASKS = (
    "das_lab.tasks.classification.ClassificationModule",
    "das_lab.tasks.detection.DetectionModule",
    "das_lab.tasks.segmentation.SegmentationModule",
)
# a job folder without metrics.json whose files changed within this many seconds is still running
RUNNING_WINDOW_S = 30 * 60
SEED_KEY = "seed"


@dataclass
class Job:
    """One job folder of a sweep, as far as it got."""

    path: Path
    label: str
    status: str
    overrides: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    monitor: Optional[str] = None
    declared: Declarations = field(default_factory=dict)

    def value(self, kind: str, metric: str) -> Optional[float]:
        """``kind`` is ``best`` or ``final``; None when the job did not record the metric."""
        value = self.metrics.get(kind, {}).get(metric)
        return float(value) if value is not None else None


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``["model=resnet_tiny", "+experiment=x"]`` -> ``{"model": "resnet_tiny", "experiment": "x"}``."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep:
            parsed[key.lstrip("+~")] = value
    return parsed


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _newest_change(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=folder.stat().st_mtime)


@functools.lru_cache(maxsize=None)
def _declared_by(targets: tuple[str, ...]) -> tuple[MetricSpec, ...]:
    from hydra.utils import get_class

    specs: list[MetricSpec] = []
    for target in targets:
        try:
            specs += task_metrics(get_class(target))
        except (ImportError, ValueError, TypeError):  # a task class that is gone or declares nothing
            continue
    return tuple(specs)


def run_declarations(metrics: dict[str, Any], config: dict[str, Any]) -> Declarations:
    """How a run's metrics are judged and shown: the ``metrics`` entry of its metrics.json; for older runs,
    the declarations of the task its config names (else of the built-in tasks), with its ``monitor_mode``."""
    if isinstance(metrics.get("metrics"), dict):
        return declarations_from_record(metrics["metrics"])
    task = config.get("task")
    target = task.get("_target_") if isinstance(task, dict) else None
    specs = _declared_by((target,) if target else BUILTIN_TASKS)
    return metric_declarations(specs, config.get("monitor"), config.get("monitor_mode"))


def read_job(folder: Path, label: str, now: float) -> Job:
    """A job from its folder: metrics.json when written, else the Hydra files and a FAILED marker."""
    config = _read_yaml(folder / ".hydra" / "config.yaml")
    config = config if isinstance(config, dict) else {}
    monitor = config.get("monitor")
    metrics_path = folder / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        return Job(
            folder,
            label,
            metrics.get("status", "unknown"),
            parse_overrides(metrics.get("overrides", [])),
            metrics,
            monitor,
            run_declarations(metrics, config),
        )
    overrides = parse_overrides(_read_yaml(folder / ".hydra" / "overrides.yaml") or [])
    if (folder / "FAILED").is_file():
        status = "failed"
    else:
        status = "running" if now - _newest_change(folder) < RUNNING_WINDOW_S else "missing"
    return Job(folder, label, status, overrides, {}, monitor)


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Sweep folders named directly or by glob patterns; an error names the pattern that matched nothing."""
    folders: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()))) if glob.has_magic(pattern) else [pattern]
        existing = [Path(m) for m in matches if Path(m).is_dir()]
        if not existing:
            raise FileNotFoundError(f"no sweep folder at {pattern}: give a multirun folder, e.g. multirun/DATE/TIME")
        folders.extend(existing)
    return folders


def find_jobs(folders: Sequence[Path]) -> list[Job]:
    """Every job folder (one holding ``.hydra/``) under ``folders``, in sweep and job-number order."""
    now = time.time()
    jobs: list[Job] = []
    for folder in folders:
        job_dirs = sorted({p.parent for p in folder.rglob(".hydra")}, key=_job_sort_key)
        for job_dir in job_dirs:
            relative = job_dir.relative_to(folder).as_posix()
            name = job_dir.name if relative == "." else relative
            number = name.split("_", 1)[0]
            label = number if len(folders) == 1 else f"{folder.name}/{number}"
            jobs.append(read_job(job_dir, label, now))
    if not jobs:
        raise FileNotFoundError(
            f"no job folders (with .hydra/) under {', '.join(map(str, folders))}: is this a `das-lab train -m` folder?"
        )
    return jobs


def _job_sort_key(path: Path) -> tuple:
    head = path.name.split("_", 1)[0]
    return (str(path.parent), int(head) if head.isdigit() else math.inf, path.name)


def swept_keys(jobs: Sequence[Job]) -> list[str]:
    """Override keys whose values differ across jobs (a key missing from some jobs differs too)."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def declarations(jobs: Sequence[Job]) -> Declarations:
    """The jobs' declarations merged (the first job that declares a metric decides how it is shown)."""
    merged: Declarations = {}
    for job in jobs:
        for key, spec in job.declared.items():
            merged.setdefault(key, spec)
    return merged


def _headline(jobs: Sequence[Job], stage: str) -> list[str]:
    """Headline metrics of ``stage`` that some job recorded, in the order the tasks declare them."""
    recorded = {name for job in jobs for kind in ("best", "final") for name in job.metrics.get(kind, {})}
    return [
        key
        for key, spec in declarations(jobs).items()
        if spec.headline and key.startswith(f"{stage}/") and key in recorded
    ]


def metric_columns(jobs: Sequence[Job]) -> list[tuple[str, str]]:
    """(best|final, metric) pairs of the headline metrics some job recorded: best/final val, final test."""
    return [(kind, metric) for metric in _headline(jobs, "val") for kind in ("best", "final")] + [
        ("final", metric) for metric in _headline(jobs, "test")
    ]


def primary_metric(jobs: Sequence[Job]) -> Optional[str]:
    """The metric the sweep optimised (the jobs' ``monitor``) when recorded, else the first headline val metric."""
    recorded = {name for job in jobs for name in job.metrics.get("best", {})}
    monitors = [job.monitor for job in jobs if job.monitor in recorded]
    if monitors:
        return monitors[0]
    return next(iter(_headline(jobs, "val")), None)


def format_metric(declared: Declarations, metric: str, value: Optional[float]) -> str:
    """A value as its declaration shows it (a metric nobody declared: as a plain number)."""
    if metric in declared:
        return declared[metric].format(value)
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def metric_label(declared: Declarations, metric: str, text: str) -> str:
    """``text`` naming ``metric`` with the unit its values are shown in."""
    return declared[metric].label(text) if metric in declared else text


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def table(
    jobs: Sequence[Job], keys: Sequence[str], columns: Sequence[tuple[str, str]]
) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the report table."""
    declared = declarations(jobs)
    header = ["job", *keys, "params (M)", "GFLOPs"]
    header += [metric_label(declared, metric, f"{kind} {metric}") for kind, metric in columns]
    header += ["time", "status"]
    rows = []
    for job in jobs:
        params, gflops = job.metrics.get("params"), job.metrics.get("gflops")
        rows.append(
            [
                job.label,
                *(job.overrides.get(k, "-") for k in keys),
                f"{params / 1e6:.3f}" if params is not None else "-",
                f"{gflops:.3f}" if gflops is not None else "-",
                *(format_metric(declared, metric, job.value(kind, metric)) for kind, metric in columns),
                _fmt_time(job.metrics.get("wall_time_s")),
                job.status,
            ]
        )
    return header, rows


def write_report_csv(path: Path, jobs: Sequence[Job], keys: Sequence[str], columns: Sequence[tuple[str, str]]) -> None:
    """Raw values (fractions, seconds, parameter counts) for further analysis."""
    header = [
        "job",
        *keys,
        "params",
        "gflops",
        *(f"{kind} {metric}" for kind, metric in columns),
        "wall_time_s",
        "status",
        "path",
    ]
    write_csv(
        path,
        header,
        (
            [
                job.label,
                *(job.overrides.get(k) for k in keys),
                job.metrics.get("params"),
                job.metrics.get("gflops"),
                *(job.value(k, m) for k, m in columns),
                job.metrics.get("wall_time_s"),
                job.status,
                str(job.path),
            ]
            for job in jobs
        ),
    )


def _first_seen(values: Sequence[str]) -> list[str]:
    """Distinct values in sweep order (the order the experiment file lists them)."""
    return list(dict.fromkeys(values))


def _numeric(values: Sequence[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def seed_groups(jobs: Sequence[Job], keys: Sequence[str], metric: str) -> dict[tuple[str, ...], list[float]]:
    """Best ``metric`` of completed jobs grouped by their non-seed swept values (seeds pooled)."""
    groups: dict[tuple[str, ...], list[float]] = {}
    for job in jobs:
        value = job.value("best", metric)
        if job.status == "completed" and value is not None and math.isfinite(value):
            groups.setdefault(tuple(job.overrides.get(k, "-") for k in keys), []).append(value)
    return groups


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def plot_metric(out_dir: Path, jobs: Sequence[Job], keys: Sequence[str], metric: str) -> list[Path]:
    """One PNG per swept key: ``metric`` per value, a line per setting of the other keys, mean +- std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varied = [k for k in keys if k != SEED_KEY] or [k for k in keys if k == SEED_KEY]
    pooled = [k for k in keys if k != SEED_KEY]
    groups = (
        seed_groups(jobs, pooled, metric)
        if pooled
        else {
            (str(job.overrides.get(SEED_KEY)),): [job.value("best", metric)]
            for job in jobs
            if job.status == "completed" and job.value("best", metric) is not None
        }
    )
    if not groups:
        return []
    declared = declarations(jobs)
    scale = 100.0 if metric in declared and declared[metric].unit == "fraction" else 1.0
    written = []
    for key in varied:
        position = (pooled or [SEED_KEY]).index(key)
        x_values = _first_seen([setting[position] for setting in groups])
        series: dict[tuple[str, ...], dict[str, list[float]]] = {}
        for setting, values in groups.items():
            rest = setting[:position] + setting[position + 1 :]
            series.setdefault(rest, {})[setting[position]] = values
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(x_values) + 2), 3.2))
        others = [k for k in (pooled or [SEED_KEY]) if k != key]
        for rest, points in sorted(series.items()):
            xs = [i for i, v in enumerate(x_values) if v in points]
            stats = [_mean_std(points[x_values[i]]) for i in xs]
            label = ", ".join(f"{k}={v}" for k, v in zip(others, rest)) or None
            ax.errorbar(
                xs,
                [m * scale for m, _ in stats],
                yerr=[s * scale for _, s in stats],
                marker="o",
                capsize=3,
                linestyle="-" if _numeric(x_values) else "none",
                label=label,
            )
        ax.set_xticks(range(len(x_values)))
        ax.set_xticklabels(x_values, rotation=30 if max(map(len, x_values)) > 6 else 0, ha="right", fontsize=8)
        ax.set_xlabel(key)
        title = declared[metric].title if metric in declared else metric
        ax.set_ylabel(metric_label(declared, metric, f"best {title}"))
        seeds = max(len(v) for v in groups.values())
        ax.set_title(
            f"best {metric} vs {key}" + (f" (mean ± std over {seeds} seeds)" if pooled and seeds > 1 else ""),
            fontsize=9,
        )
        if any(label for label in ax.get_legend_handles_labels()[1]):
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"report_{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def seed_summary(jobs: Sequence[Job], keys: Sequence[str], metric: str) -> Optional[str]:
    """Markdown table of mean +- std of ``metric`` over seeds, when ``seed`` is one of the swept keys."""
    if SEED_KEY not in keys:
        return None
    pooled = [k for k in keys if k != SEED_KEY]
    groups = seed_groups(jobs, pooled, metric)
    if not groups:
        return None
    declared = declarations(jobs)
    rows = []
    for setting, values in groups.items():
        mean, std = _mean_std(values)
        rows.append(
            [
                *setting,
                f"{format_metric(declared, metric, mean)} ± {format_metric(declared, metric, std)}",
                str(len(values)),
            ]
        )
    return markdown_table([*pooled, metric_label(declared, metric, f"best {metric}"), "seeds"], rows)


def build_report(folders: Sequence[Path], out_dir: Path) -> str:
    """Write report.md, report.csv and the plots into ``out_dir``; returns the printed table."""
    jobs = find_jobs(folders)
    keys = swept_keys(jobs)
    columns = metric_columns(jobs)
    header, rows = table(jobs, keys, columns)
    text = markdown_table(header, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report_csv(out_dir / "report.csv", jobs, keys, columns)
    metric = primary_metric(jobs)
    plots = plot_metric(out_dir, jobs, keys, metric) if metric and keys else []
    counts = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    lines = [
        "# Sweep report",
        "",
        "Sweeps: " + ", ".join(f"`{f}`" for f in folders),
        "",
        "Jobs: " + ", ".join(f"{n} {status}" for status, n in counts.items()),
        "",
        text,
    ]
    summary = seed_summary(jobs, keys, metric) if metric else None
    if summary:
        lines += ["", "## Mean ± std over seeds", "", summary]
    lines += [line for plot in plots for line in ("", f"![{plot.stem}]({plot.name})")]
    from das_lab.search.report import search_section

    searches = [
        section for folder in folders if (section := search_section(folder, out_dir, declarations(jobs))) is not None
    ]
    lines += [line for section in searches for line in section]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return "\n".join([text, *(line for section in searches for line in section if not line.startswith("!["))])


def main(args: Sequence[str]) -> int:
    """``das-lab report PATH [PATH ...] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="das-lab report",
        description="Table (report.md, report.csv) and plots of the jobs of multirun folders.",
    )
    parser.add_argument("paths", nargs="+", help="multirun folder(s) or glob pattern(s), e.g. multirun/2026-11-29/*")
    parser.add_argument("--out", help="where to write report.md, report.csv and the PNGs (default: the first PATH)")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the table and plots to W&B (offline without a key)"
    )
    parser.add_argument("--wandb-project", default="das-lab", help="W&B project of the report run (default: das-lab)")
    options = parser.parse_args(list(args))
    try:
        folders = expand_paths(options.paths)
        out_dir = Path(options.out).expanduser() if options.out else folders[0]
        print(build_report(folders, out_dir))
    except (FileNotFoundError, ValueError) as error:
        print(f"das-lab report: error: {error}", file=sys.stderr)
        return 2
    print(f"\nwritten: {out_dir / 'report.md'}, {out_dir / 'report.csv'} and plots in {out_dir}")
    if options.wandb:
        from das_lab.wandb_report import log_report

        print(f"W&B run: {log_report(folders, out_dir, options.wandb_project)}")
    return 0
