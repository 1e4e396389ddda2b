"""Hyper-parameter search (hparams_search=optuna): search space, the shared study, workers, retries, report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from cli_helpers import DAS_LAB, TINY, read_metrics, run_cli
from das_lab.cli import _register_resolvers
from das_lab.config import config_dir
from das_lab.search import SEARCH_RECORD, SearchConfigError
from das_lab.search.report import HISTORY_PNG, IMPORTANCE_PNG, search_section
from das_lab.search.space import parse_space
from das_lab.search.study import (
    HEARTBEAT_KEY,
    WORKER_KEY,
    check_heartbeat,
    fail_and_retry,
    fail_stale_trials,
    finish_trial,
    has_running_trials,
    open_storage,
    open_study,
    save_location,
    start_trials,
    trials_to_start,
)

# one training and one validation step per trial, no test; fast heartbeats so a dead worker is noticed in seconds
SEARCH = [
    "train",
    "-m",
    "hparams_search=optuna",
    "model=resnet_tiny",
    *TINY,
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "test=false",
    "hydra.sweeper.heartbeat_interval=1",
    "hydra.sweeper.grace_period=3",
]


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_space_reads_hydra_sweep_syntax():
    space = parse_space(
        {
            "optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
            "model.drop_path_rate": "interval(0.0, 0.3)",
            "model.depth": "range(1, 7, 2)",
            "data.scale": "range(0.5, 2.0, 0.5)",
            "optimizer": "choice(sgd, adamw)",
            "data.batch_size": "16,32,64",
            "seed": 3,
        },
        ["model=resnet_tiny", "+extra=choice(x, y)", "model.drop_path_rate=interval(0.1, 0.2)"],
    )
    assert space.distributions == {
        "optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "model.drop_path_rate": FloatDistribution(0.1, 0.2),
        "model.depth": IntDistribution(1, 5, step=2),
        "data.scale": FloatDistribution(0.5, 1.5, step=0.5),
        "optimizer": CategoricalDistribution(["sgd", "adamw"]),
        "data.batch_size": CategoricalDistribution([16, 32, 64]),
        "extra": CategoricalDistribution(["x", "y"]),
    }
    assert space.fixed == ["seed=3", "model=resnet_tiny"]
    assert space.overrides({"optimizer.lr": 0.001, "model.depth": 3, "extra": "y"}) == [
        "seed=3",
        "model=resnet_tiny",
        "optimizer.lr=0.001",
        "model.depth=3",
        "+extra=y",
    ]


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("normal(0, 1)", "cannot read it"),
        ("tag(lgo, interval(1e-4, 1e-2))", "unknown tag lgo"),
        ("shuffle(1, 2, 3)", "shuffle(...) has no meaning"),
        ("tag(log, choice(1, 2))", "applies to interval(LOW, HIGH) only"),
        ("tag(log, interval(0, 1))", "positive lower bound"),
    ],
)
def test_unknown_distribution_is_one_line(entry, expected):
    with pytest.raises(SearchConfigError) as error:
        parse_space({"optimizer.lr": entry}, [])
    message = _one_line(error)
    assert expected in message and f"optimizer.lr={entry}" in message


@pytest.mark.parametrize(
    "storage", ["sqlite:///{tmp}/no/such/folder/optuna.db", "{tmp}/a_file/optuna.journal", "nosuchdb://host/db"]
)
def test_storage_that_cannot_be_opened_is_one_line(tmp_path, storage):
    (tmp_path / "a_file").write_text("")
    url = storage.format(tmp=tmp_path)
    with pytest.raises(SearchConfigError) as error:
        open_storage(url)
    message = _one_line(error)
    assert message.startswith(f"cannot open the search storage hydra.sweeper.storage={url} (")
    assert "expected a journal file path" in message


def test_study_of_another_direction_is_one_line(tmp_path):
    storage = open_storage(str(tmp_path / "optuna.journal"))
    study = open_study(storage, "train", "min", None, "here")
    study.add_trial(optuna.create_trial(value=0.5))
    assert len(open_study(storage, "train", "minimize", None, "here").trials) == 1
    with pytest.raises(SearchConfigError) as error:
        open_study(storage, "train", "max", None, "the sweep folder")
    assert _one_line(error).startswith(
        "study 'train' in the sweep folder was created to minimize its objective, this search would maximize it"
    )
    with pytest.raises(SearchConfigError, match="expected max or min"):
        open_study(storage, "train", "up", None, "here")


def test_grace_period_must_outlast_the_heartbeat():
    check_heartbeat(60, 180)
    with pytest.raises(SearchConfigError) as error:
        check_heartbeat(60, 30)
    assert _one_line(error).endswith("else live trials count as dead")


@pytest.mark.parametrize("url", ["{tmp}/optuna.journal", "sqlite:///{tmp}/optuna.db"])
def test_dead_trials_fail_and_run_once_more(tmp_path, url):
    storage = open_storage(url.format(tmp=tmp_path))
    study = open_study(storage, "s", "max", optuna.samplers.RandomSampler(seed=0), "here")
    space = {"x": FloatDistribution(0.0, 1.0)}
    assert trials_to_start(study, n_trials=3, n_jobs=2) == 2
    first, second = start_trials(study, storage, space, 2)
    assert study.trials[0].system_attrs[WORKER_KEY] == study.trials[1].system_attrs[WORKER_KEY]
    assert trials_to_start(study, n_trials=3, n_jobs=2) == 1
    assert finish_trial(study, first, 0.5) == "COMPLETE"
    assert fail_stale_trials(study, storage, grace_period=60, max_retry=1) == []  # alive: recent heartbeat
    time.sleep(0.05)
    assert fail_stale_trials(study, storage, grace_period=0.01, max_retry=1) == [1]
    assert fail_and_retry(study, storage, [second._trial_id], max_retry=1) == []  # another worker was first
    retry = study.trials[2]
    assert (retry.state.name, retry.params, retry.system_attrs["failed_trial"]) == ("WAITING", second.params, 1)
    # the retry counts as the trial it repeats: one queued retry plus one new trial make the three
    assert trials_to_start(study, n_trials=3, n_jobs=4) == 2
    (again,) = start_trials(study, storage, space, 1)
    assert again.number == 2 and again.params == second.params
    assert study.trials[2].system_attrs[HEARTBEAT_KEY] > retry.system_attrs[HEARTBEAT_KEY]  # beating anew
    assert has_running_trials(study)
    time.sleep(0.05)
    assert fail_stale_trials(study, storage, grace_period=0.01, max_retry=1) == [2]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL"]  # retried once only
    assert not has_running_trials(study)
    assert finish_trial(study, again, 0.7) == "FAIL"  # its worker comes back too late: the result is not counted


def test_report_of_a_search_with_too_few_trials_for_importances(tmp_path):
    storage = open_storage(str(tmp_path / "optuna.journal"))
    study = open_study(storage, "train", "max", None, "here")
    save_location(tmp_path, "train", str(tmp_path / "optuna.journal"), "val/acc1", "max")
    assert (tmp_path / SEARCH_RECORD).read_text().startswith("study_name: train\nstorage: optuna.journal\n")
    out = tmp_path / "report"
    out.mkdir()
    assert "No completed trial yet" in "\n".join(search_section(tmp_path, out))
    study.add_trial(
        optuna.create_trial(value=0.25, params={"x": 0.5}, distributions={"x": FloatDistribution(0.0, 1.0)})
    )
    text = "\n".join(search_section(tmp_path, out))
    assert "Best trial: 0, val/acc1 = 0.25, x=0.5" in text
    assert "Parameter importances need at least 2 completed trials (this study has 1)." in text
    assert (out / HISTORY_PNG).stat().st_size > 0 and not (out / IMPORTANCE_PNG).exists()
    assert search_section(tmp_path / "report", out) is None  # an ordinary sweep has no search section


def test_search_config_follows_monitor_mode(tmp_path):
    _register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hparams_search=optuna", "monitor=val/loss", "monitor_mode=min", f"hydra.sweep.dir={tmp_path}"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "min" and sweeper.storage == f"{tmp_path}/optuna.journal"
    assert sweeper._target_ == "hydra_plugins.das_lab_search.optuna_sweeper.OptunaSearchSweeper"
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "model.drop_path_rate"}


def _study(sweep: Path) -> optuna.Study:
    return optuna.load_study(study_name="train", storage=open_storage(str(sweep / "optuna.journal")))


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "HYDRA_FULL_ERROR")}
    return subprocess.Popen(
        [DAS_LAB, *args],
        cwd=cwd,
        env={**env, "DAS_LAB_LOGS": str(cwd)},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill_during_its_second_trial(worker: subprocess.Popen, sweep: Path) -> optuna.trial.FrozenTrial:
    """SIGKILL ``worker`` while it trains its second trial (after it wrote that trial's run_info.json)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and worker.poll() is None:
        mine = (
            [t for t in _study(sweep).trials if t.system_attrs.get(WORKER_KEY, "").endswith(f":{worker.pid}")]
            if (sweep / SEARCH_RECORD).is_file()
            else []
        )  # written once the study exists
        running = [t for t in mine if t.state.name == "RUNNING" and list(sweep.glob(f"{t.number}_*/run_info.json"))]
        if running and any(t.state.name == "COMPLETE" for t in mine):
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            return running[0]
        time.sleep(0.1)
    pytest.fail(f"the worker ran no second trial: {worker.communicate()[1][-3000:]}")


@pytest.mark.slow
def test_search_with_two_workers_survives_a_killed_worker_and_continues(tmp_path):
    sweep = tmp_path / "search"
    args = [*SEARCH, f"hydra.sweep.dir={sweep}"]
    doomed, survivor = [_start([*args, "hydra.sweeper.n_trials=5"], tmp_path) for _ in range(2)]
    killed = _kill_during_its_second_trial(doomed, sweep)
    stdout, stderr = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, stderr[-3000:]
    # the survivor waited for the killed worker's trial, found it silent, failed it and ran it again
    assert f"trial {killed.number}: its worker stopped" in stdout + stderr
    trials = _study(sweep).trials
    assert [t.number for t in trials if t.state.name != "COMPLETE"] == [killed.number]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params and retry.system_attrs[WORKER_KEY].endswith(f":{survivor.pid}")
    workers = {t.system_attrs[WORKER_KEY] for t in trials if t.state.name == "COMPLETE"}
    assert len(workers) == 2  # both workers completed trials of the one study
    assert len({t.number for t in trials} - {retry.number}) in (5, 6)  # 6: both asked for the last one at once
    for trial in trials:
        if trial.state.name == "COMPLETE":
            (job,) = sweep.glob(f"{trial.number}_*")
            metrics = read_metrics(job)
            assert trial.value == pytest.approx(metrics["best"]["val/acc1"])
            assert f"optimizer.lr={trial.params['optimizer.lr']!r}" in metrics["overrides"]

    searched = len(trials) - 1  # the retry counts as the trial it repeats
    resumed = run_cli([*args, f"hydra.sweeper.n_trials={searched + 1}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(trials)} trial(s) so far" in resumed.stdout + resumed.stderr
    trials = _study(sweep).trials
    assert len(trials) == searched + 2 and trials[-1].state.name == "COMPLETE"

    report = run_cli(["report", str(sweep)], cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "## Search `train` (maximize val/acc1)" in report.stdout and "Best trial: " in report.stdout
    search_table = report.stdout.split("## Search")[1].splitlines()
    (row,) = [line for line in search_table if line.startswith(f"| {killed.number} ")]
    assert "FAIL" in row
    (row,) = [line for line in search_table if line.startswith(f"| {retry.number} ")]
    assert "COMPLETE" in row and f"| {killed.number} " in row
    assert (sweep / HISTORY_PNG).stat().st_size > 0 and (sweep / IMPORTANCE_PNG).stat().st_size > 0


@pytest.mark.slow
def test_failed_jobs_are_fail_trials_and_the_search_goes_on(tmp_path):
    sweep = tmp_path / "search"
    result = run_cli(
        [
            *SEARCH,
            f"hydra.sweep.dir={sweep}",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "data.digit_size=99",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Launching 2 jobs, each in its own process" in result.stdout  # n_jobs trials at a time, through the launcher
    assert "2 job(s) of the sweep failed" in result.stderr
    assert [t.state.name for t in _study(sweep).trials] == ["FAIL", "FAIL"]
    assert sorted(read_metrics(job)["status"] for job in sweep.glob("*_*")) == ["failed", "failed"]

    # the same folder searched the other way round: one line, no traceback
    clash = run_cli([*SEARCH, f"hydra.sweep.dir={sweep}", "monitor_mode=min"], cwd=tmp_path)
    assert clash.returncode == 2
    assert (
        clash.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"das-lab: error: study 'train' in {sweep / 'optuna.journal'} was created to maximize its objective"
        )
    )
    assert "Traceback" not in clash.stderr


def test_search_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` meets without das-lab[search]
    with pytest.raises(SearchConfigError) as error:
        parse_space({"optimizer.lr": "interval(0.1, 0.2)"}, [])
    assert _one_line(error).endswith("pip install 'das-lab[search]'")
