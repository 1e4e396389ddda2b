"""The search part of ``das-lab report``: the study's trials, its best trial, Optuna's plots as PNGs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from das_lab.search import import_optuna
from das_lab.search.study import WORKER_KEY, load_location, open_storage
from das_lab.tasks.base import MetricSpec
from das_lab.utils.tables import markdown_table

# fANOVA importances compare completed trials: with fewer there is nothing to compare
MIN_TRIALS_FOR_IMPORTANCE = 2
HISTORY_PNG = "search_history.png"
IMPORTANCE_PNG = "search_importances.png"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def _value_format(objective: Optional[MetricSpec]) -> Callable[[Optional[float]], str]:
    return objective.format if objective is not None else _fmt


def trials_table(study: Any, objective: Optional[MetricSpec] = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one trial per row with its state, value, parameters, worker and retry origin.

    Values are shown as the objective's declaration says (fractions in percent) when it is known.
    """
    trials = study.get_trials(deepcopy=False)
    names = list(dict.fromkeys(name for t in trials for name in t.params))
    show = _value_format(objective)
    header = [
        "trial",
        "state",
        objective.label("value") if objective else "value",
        *names,
        "retry of",
        "worker",
        "time (s)",
    ]
    rows = []
    for t in trials:
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append(
            [
                str(t.number),
                t.state.name,
                show(t.value),
                *(_fmt(t.params.get(n)) for n in names),
                _fmt(t.system_attrs.get("failed_trial")),
                _fmt(t.system_attrs.get(WORKER_KEY)),
                _fmt(duration),
            ]
        )
    return header, rows


def _save(axes: Any, path: Path) -> Path:
    figure = axes.figure
    figure.set_size_inches(6.4, 4.0)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def write_plots(study: Any, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Optimisation history and parameter importances as PNGs; notes for plots that cannot be drawn yet."""
    import matplotlib

    matplotlib.use("Agg")
    optuna = import_optuna()
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the matplotlib plots, since Optuna 2.2
    plots = optuna.visualization.matplotlib
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    written, notes = [], []
    if not completed:
        return written, ["No completed trial yet: no optimisation history, no parameter importances."]
    written.append(_save(plots.plot_optimization_history(study), out_dir / HISTORY_PNG))
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        notes.append(
            f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials "
            f"(this study has {len(completed)})."
        )
        return written, notes
    try:
        written.append(_save(plots.plot_param_importances(study), out_dir / IMPORTANCE_PNG))
    except (ValueError, RuntimeError) as error:  # e.g. every completed trial has the same value
        notes.append(f"Parameter importances could not be computed: {error}")
    return written, notes


def search_section(
    folder: Path, out_dir: Path, declared: Optional[Mapping[str, MetricSpec]] = None
) -> Optional[list[str]]:
    """Markdown lines about the study of a search folder, writing its plots; None for other sweeps.

    ``declared`` (logged name -> MetricSpec, from the sweep's runs) says how to show the objective.
    """
    location = load_location(folder)
    if location is None:
        return None
    optuna = import_optuna()
    study = optuna.load_study(study_name=location["study_name"], storage=open_storage(location["storage"]))
    objective = location.get("objective") or "objective"
    spec = (declared or {}).get(objective)
    header, rows = trials_table(study, spec)
    lines = [
        "",
        f"## Search `{location['study_name']}` ({location['direction']} {objective})",
        "",
        markdown_table(header, rows),
        "",
    ]
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if completed:
        best = study.best_trial
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        shown = spec.label(objective) if spec is not None else objective
        lines.append(f"Best trial: {best.number}, {shown} = {_value_format(spec)(best.value)}, {params}")
    plots, notes = write_plots(study, out_dir)
    lines += [line for note in notes for line in ("", note)]
    lines += [line for plot in plots for line in ("", f"![{plot.stem}]({plot.name})")]
    return lines
