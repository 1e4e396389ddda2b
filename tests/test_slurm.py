"""Sweeps on a real SLURM scheduler: a single-node cluster on this machine (scripts/slurm_cluster.sh).

`.ci/run` starts the cluster before the tests; elsewhere the first test starts one when it can (root on
Debian/Ubuntu) and stops it afterwards. Without a cluster these tests are skipped, with the reason,
except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from cli_helpers import DAS_LAB, TINY, read_metrics, run_cli

# `make test` runs a file's tests on one pytest-xdist worker, in turn: the cluster has one node, and their
# timings assume it is theirs
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_cluster.sh"
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.timeout_min=10",
]
# two training and one validation step per epoch, no test
FAST = [*TINY, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]


def _cluster(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), command], capture_output=True, text=True, timeout=900)


def _slurm_conf(output: str) -> str:
    return next(line.split("=", 1)[1] for line in output.splitlines() if line.startswith("SLURM_CONF="))


@pytest.fixture(scope="session")
def slurm_conf() -> str:
    """SLURM_CONF of a running single-node cluster; started (and stopped afterwards) when none runs."""
    status = _cluster("status")
    if status.returncode == 0:
        conf = _slurm_conf(status.stdout)
        # the cluster is the tests' own: jobs an interrupted earlier session left queued would pass for these tests'
        subprocess.run(["scancel", f"--user={os.getuid()}"], env={**os.environ, "SLURM_CONF": conf}, check=True)
        yield conf
        return
    if os.geteuid() == 0:
        started = _cluster("start")
        reason = f"scripts/slurm_cluster.sh start failed:\n{started.stderr[-2000:]}"
    else:
        started, reason = None, "no SLURM cluster runs and starting one needs root: sudo scripts/slurm_cluster.sh start"
    if started is None or started.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the SLURM tests against a real cluster; {reason}")
        pytest.skip(reason)
    yield _slurm_conf(started.stdout)
    _cluster("stop")


@pytest.fixture()
def slurm(slurm_conf, tmp_path) -> Iterator[Callable[[list[str]], subprocess.CompletedProcess]]:
    """Run a SLURM command (squeue, scancel, sacct) against the test cluster."""
    env = {**os.environ, "SLURM_CONF": slurm_conf}

    def _run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=True)

    yield _run
    # the next test reads the queue as its own: SLURM may still be tidying up (COMPLETING) after this one
    _wait_for(lambda: not _queued(_run, tmp_path), "the jobs of the test to leave the queue", timeout_s=120)


def _start_sweep(args: list[str], cwd: Path, slurm_conf: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "HYDRA_FULL_ERROR")}
    env.update(DAS_LAB_LOGS=str(cwd), SLURM_CONF=slurm_conf)
    return subprocess.Popen(
        [DAS_LAB, "train", "-m", *SLURM, *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(condition: Callable[[], object], what: str, timeout_s: float = 240) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _job_dirs(root: Path) -> list[Path]:
    (sweep,) = (root / "multirun").glob("*/*")
    return sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())


def _queued(slurm, root: Path) -> list[str]:
    """``[job id, state, ...]`` of the queued jobs submitted from ``root`` (a test's folder): only this test's jobs."""
    lines = slurm(["squeue", "-h", "-o", "%i %T %Z"]).stdout.splitlines()
    return [value for line in lines if line.split()[2].startswith(str(root)) for value in line.split()[:2]]


def _status(job_dir: Path) -> str | None:
    try:
        return json.loads((job_dir / "metrics.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def _epochs(job_dir: Path) -> list[int]:
    with (job_dir / "csv" / "metrics.csv").open() as file:
        return [int(row["epoch"]) for row in csv.DictReader(file) if row.get("val/acc1")]


def test_sweep_runs_as_an_array_and_reports_its_failed_job(slurm_conf, slurm, tmp_path):
    result = run_cli(
        ["train", "-m", *SLURM, *FAST, "data.digit_size=99,16"], cwd=tmp_path, env={"SLURM_CONF": slurm_conf}
    )
    assert result.returncode == 1, result.stderr[-3000:]
    failed, completed = _job_dirs(tmp_path)
    assert "1 job(s) of the sweep failed" in result.stderr and str(failed) in result.stderr
    assert read_metrics(failed)["status"] == "failed" and (failed / "FAILED").is_file()
    assert read_metrics(completed)["status"] == "completed" and not (completed / "FAILED").exists()
    array_tasks = sorted(p.name for p in (tmp_path / "multirun").glob("*/*/.submitit/[0-9]*_[0-9]*"))
    assert len(array_tasks) == 2 and array_tasks[0].endswith("_0") and array_tasks[1].endswith("_1")
    # one array job of two tasks (SLURM may still be tidying up after the tasks have written their results)
    tasks = slurm(["sacct", "-X", "-n", "-P", "-o", "JobID", "-j", array_tasks[0].split("_")[0]]).stdout
    assert sorted(tasks.split()) == array_tasks
    command = json.loads((completed / "run_info.json").read_text())["command"]
    assert command[:2] == [DAS_LAB, "train"] and "data.digit_size=16" in command


def test_cancelled_job_is_recorded_failed_with_its_slurm_state(slurm_conf, slurm, tmp_path):
    sweep = _start_sweep([*FAST, "trainer.max_epochs=50"], tmp_path, slurm_conf)
    (job_id, _) = _wait_for(lambda: _queued(slurm, tmp_path), "the job to be queued")
    slurm(["scancel", job_id])
    _, stderr = sweep.communicate(timeout=240)
    assert sweep.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "1 job(s) of the sweep failed" in stderr
    (job_dir,) = _job_dirs(tmp_path)
    metrics = read_metrics(job_dir)
    assert metrics["status"] == "failed" and metrics["slurm_state"] == "CANCELLED"
    assert f"SLURM ended job {job_id} with state CANCELLED" in (job_dir / "FAILED").read_text()


def test_requeue_by_usr2_resumes_from_last_checkpoint_to_the_uninterrupted_result(slurm_conf, slurm, tmp_path):
    # two identical jobs; the first is preempted (USR2) once its first epoch is saved, the second runs through
    sweep = _start_sweep([*FAST, "trainer.max_epochs=8", "ckpt_path=auto", "seed=3,3"], tmp_path, slurm_conf)
    preempted = _wait_for(
        lambda: next(iter(tmp_path.glob("multirun/*/*/0_*/checkpoints/last.ckpt")), None), "the first checkpoint"
    ).parents[1]
    array_job = _wait_for(lambda: _queued(slurm, tmp_path), "the jobs")[0].split("_")[0]
    slurm(["scancel", "--signal=USR2", f"{array_job}_0"])
    _wait_for(lambda: _status(preempted) == "requeued", "the requeued record", timeout_s=60)
    assert not (preempted / "FAILED").exists()
    requeued_wall_time = read_metrics(preempted)["wall_time_s"]
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr[-3000:]
    resumed, uninterrupted = (read_metrics(d) for d in _job_dirs(tmp_path))
    assert resumed["status"] == uninterrupted["status"] == "completed" and not (preempted / "FAILED").exists()
    assert resumed["final"] == pytest.approx(uninterrupted["final"], rel=1e-6)
    assert resumed["best"] == pytest.approx(uninterrupted["best"], rel=1e-6)
    assert resumed["wall_time_s"] > requeued_wall_time
    assert _epochs(preempted) == list(range(8))  # the history of both attempts, each epoch once
    assert "Requeued job" in (preempted / "train.log").read_text()


def _elapsed_s(slurm, job_id: str) -> int:
    """Seconds the job has run, from squeue's [[D-]H:]M:SS."""
    seconds = 0
    for part in slurm(["squeue", "-h", "-j", job_id, "-o", "%M"]).stdout.strip().replace("-", ":").split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def test_requeue_at_the_time_limit_resumes_and_keeps_the_history(slurm_conf, slurm, tmp_path):
    # 40 s of training; once the first epoch is saved, the job's time limit is cut so that it ends 30-90 s
    # later: SLURM (checking every 30 s) sends the signal 90 s before the limit at its next check, the job
    # is requeued, gets its long limit back while it waits, and resumes
    sweep = _start_sweep(
        [
            *FAST,
            "hydra.launcher.signal_delay_s=90",
            '+trainer.max_time="00:00:00:40"',
            "trainer.max_epochs=100000",
            "ckpt_path=auto",
            "seed=1",
        ],
        tmp_path,
        slurm_conf,
    )
    job_dir = _wait_for(
        lambda: next(iter(tmp_path.glob("multirun/*/*/0_*/checkpoints/last.ckpt")), None), "the first checkpoint"
    ).parents[1]
    (job_id, _) = _queued(slurm, tmp_path)
    limit_min = -(-(_elapsed_s(slurm, job_id) + 30) // 60)
    slurm(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit_min}"])
    _wait_for(lambda: _status(job_dir) == "requeued", "the requeue at the time limit", timeout_s=90)
    slurm(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"])
    assert not (job_dir / "FAILED").exists()
    requeued_wall_time = read_metrics(job_dir)["wall_time_s"]
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr[-3000:]
    metrics = read_metrics(job_dir)
    assert metrics["status"] == "completed" and not (job_dir / "FAILED").exists()
    assert metrics["wall_time_s"] > requeued_wall_time
    log = (job_dir / "train.log").read_text()
    assert "Requeued job" in log and "this job is timed-out" in log
    epochs = _epochs(job_dir)
    assert epochs == list(range(len(epochs))) and len(epochs) > 1


def test_ddp_job_runs_two_ranks_that_leave_promptly_when_requeued(slurm_conf, slurm, tmp_path):
    sweep = _start_sweep(
        [
            *FAST,
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.max_epochs=5",
            "ckpt_path=auto",
            "seed=2",
        ],
        tmp_path,
        slurm_conf,
    )
    job_dir = _wait_for(
        lambda: next(iter(tmp_path.glob("multirun/*/*/0_*/checkpoints/last.ckpt")), None), "the first checkpoint"
    ).parents[1]
    (job_id, _) = _queued(slurm, tmp_path)
    slurm(["scancel", "--signal=USR2", job_id])
    signalled = time.monotonic()
    # both ranks leave at once (a rank left waiting in a collective would hold the job until KillWait, 30 s)
    _wait_for(lambda: _queued(slurm, tmp_path)[1:] == ["PENDING"], "the job to be requeued", timeout_s=60)
    assert time.monotonic() - signalled < 20
    assert _status(job_dir) == "requeued" and not (job_dir / "FAILED").exists()
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr[-3000:]
    assert read_metrics(job_dir)["status"] == "completed" and not (job_dir / "FAILED").exists()
    assert _epochs(job_dir) == list(range(5))
    task_logs = sorted((job_dir.parent / ".submitit" / job_id).glob("*_log.err"))
    assert [("MEMBER: 1/2" in log.read_text(), "MEMBER: 2/2" in log.read_text()) for log in task_logs] == [
        (True, False),
        (False, True),
    ]
    rank0, rank1 = (job_dir / "train.log").read_text(), (job_dir / "rank_1.log").read_text()
    assert "Calling checkpoint method" in rank0 and "procid=1" not in rank0
    assert "procid=1" in rank1 and "Calling checkpoint method" not in rank1
