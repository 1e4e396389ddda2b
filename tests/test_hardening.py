"""Runs that go wrong: divergence, hard-dying sweep jobs, signals, used run folders, bad input, full disks."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import DAS_LAB, TINY, read_metrics, run_cli, run_dirs

pytestmark = pytest.mark.slow

# after the first epoch's checkpoint, two more epochs for the signal to land in, even on a busy machine
LONG = [
    *[arg for arg in TINY if not arg.startswith(("trainer.max_epochs", "trainer.limit_train"))],
    "model=resnet_tiny",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=40",
    "test=false",
]


def _wait_for(path_glob: str, root: Path, process: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = sorted(root.glob(path_glob))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{path_glob} did not appear under {root} (exit {process.poll()})")


def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    """``das-lab ARGS`` in the background; its stderr goes to ``cwd/stderr.txt`` (a pipe nobody reads would fill)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "HYDRA_FULL_ERROR")}
    env["DAS_LAB_LOGS"] = str(cwd)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(Path(__file__).parent), env.get("PYTHONPATH"))))
    with open(cwd / "stderr.txt", "w") as stderr:
        return subprocess.Popen(
            [DAS_LAB, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=_interruptible,
        )


def _interruptible() -> None:
    """SIGINT as at a terminal: a shell starts background jobs (e.g. a CI script run with ``&``) with SIGINT
    ignored, and Python keeps an inherited ignore, so Ctrl+C would never reach the run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _finish(process: subprocess.Popen, cwd: Path) -> str:
    process.wait(timeout=300)
    return (cwd / "stderr.txt").read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished DAS run whose folder the tests aim other commands at."""
    root = tmp_path_factory.mktemp("hardening")
    result = run_cli(["train", *TINY], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(root)
    return root, run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {
        name: (run_dir / name).read_bytes() for name in ("metrics.json", ".hydra/config.yaml", ".hydra/overrides.yaml")
    }


def test_diverging_das_model_stops_in_one_line_with_records(tmp_path):
    result = run_cli(["train", *TINY, "optimizer.lr=1e3"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("das-lab: error:")]
    assert "became NaN/Inf at step" in line or "train/loss became nan at step" in line
    assert "DAS gate" in line or "train/loss" in line
    (run_dir,) = run_dirs(tmp_path)
    assert read_metrics(run_dir)["status"] == "failed"
    assert "NonFiniteError" in (run_dir / "FAILED").read_text()


def test_sweep_records_a_job_killed_by_a_signal_and_goes_on(tmp_path):
    steps = [arg for arg in TINY if not arg.startswith("trainer.limit_train")] + ["trainer.limit_train_batches=20"]
    process = _popen(["train", "-m", *steps, "test=false", "optimizer.lr=1e3,1e-3,2e-3"], tmp_path)
    job_one = _wait_for("multirun/*/*/1_*/.hydra", tmp_path, process)
    (child,) = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    os.kill(int(child), signal.SIGSEGV)  # what torchvision's CPU deform_conv2d did on NaN offsets
    stderr = _finish(process, tmp_path)
    assert process.returncode == 1, stderr[-3000:]
    assert "2 job(s) of the sweep failed" in stderr
    diverged, killed, completed = sorted(job_one.parent.parent.glob("[012]_*"))
    assert "became" in read_metrics(diverged)["error"]
    assert read_metrics(killed)["status"] == "failed"
    assert "killed by SIGSEGV" in read_metrics(killed)["error"]
    assert "killed by SIGSEGV" in (killed / "FAILED").read_text()
    assert read_metrics(completed)["status"] == "completed"
    report = run_cli(["report", str(job_one.parent.parent)], cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert report.stdout.count("failed") >= 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_records_interrupted_and_prints_the_resume_command(tmp_path, signum):
    pause = [
        "+callbacks.pause._target_=pause_callback.PauseAtEpoch",
        f"+callbacks.pause.ready_file={tmp_path / 'ready'}",
    ]
    process = _popen(["train", *LONG, *pause], tmp_path)
    _wait_for("ready", tmp_path, process)  # epoch 0 checkpointed, epoch 1 held until the signal lands
    (last,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    process.send_signal(signum)
    stderr = _finish(process, tmp_path)
    assert process.returncode == 128 + signum, stderr[-3000:]
    run_dir = last.parent.parent
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "interrupted" and metrics["error"] == f"interrupted by {signum.name}"
    (line,) = [line for line in stderr.splitlines() if line.startswith("das-lab: interrupted")]
    resume = line.split("resume with: ", 1)[1]
    assert resume.endswith(f"hydra.run.dir={run_dir} ckpt_path=last")
    if signum == signal.SIGTERM:  # the printed command resumes the run to the end
        resumed = run_cli(shlex.split(resume)[1:], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert read_metrics(run_dir)["status"] == "completed"


def test_eval_into_a_train_folder_writes_its_own_records(trained):
    root, run_dir = trained
    before = _snapshot(run_dir)
    ckpt = read_metrics(run_dir)["ckpt_best"]
    limits = [arg for arg in TINY if arg.startswith(("trainer.limit_val", "trainer.limit_test"))]
    result = run_cli(["eval", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}", *limits], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _snapshot(run_dir) == before
    (eval_dir,) = (run_dir / "eval").iterdir()
    assert read_metrics(eval_dir)["status"] == "completed"
    assert (eval_dir / ".hydra" / "config.yaml").is_file()


def test_failed_resume_keeps_the_completed_record(trained):
    root, run_dir = trained
    before = read_metrics(run_dir)
    result = run_cli(["train", *TINY, "model=resnet_tiny", f"hydra.run.dir={run_dir}", "ckpt_path=last"], cwd=root)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert read_metrics(run_dir) == before
    assert not (run_dir / "FAILED").exists()


def test_fresh_train_into_a_used_folder_is_refused_unless_overwritten(trained, tmp_path):
    root, run_dir = trained
    before = _snapshot(run_dir)
    result = run_cli(["train", *TINY, f"hydra.run.dir={run_dir}"], cwd=root)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"das-lab: error: {run_dir} already holds a run; resume it with ckpt_path=last, replace it with "
        f"overwrite=true, or train into a new folder (drop hydra.run.dir)"
    )
    assert _snapshot(run_dir) == before

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    result = run_cli(["train", *TINY, "test=false", f"hydra.run.dir={copy}", "overwrite=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert read_metrics(copy)["overrides"][-1] == "overwrite=true"


def test_broken_checkpoints_are_one_line(trained, tmp_path):
    _, run_dir = trained
    data = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {}, "extra": argparse_namespace()}, tmp_path / "pickled.ckpt")
    for args, expected in [
        (["eval", "ckpt_path=truncated.ckpt"], "truncated.ckpt is not a readable checkpoint (truncated"),
        (["eval", "ckpt_path=pickled.ckpt"], "pickled.ckpt holds pickled Python objects"),
        (["train", *TINY, "ckpt_path=pickled.ckpt"], "pickled.ckpt holds pickled Python objects"),
    ]:
        result = run_cli(args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=0.1)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["data.batch_size=abc"], "data.batch_size='abc': expected int (argument 'batch_size' of "),
        (["trainer.max_epoch=1"], "did you mean trainer.max_epochs?"),
        (["+trainer.max_epoch=1"], "trainer.max_epoch: not an argument of lightning.Trainer; did you mean max_epochs?"),
        (["+foo=bar"], "+foo=bar: no das-lab config reads 'foo'"),
    ],
)
def test_bad_values_name_the_key_and_leave_no_folder(tmp_path, args, expected):
    result = run_cli(["train", *TINY, *args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def test_unwritable_run_folder_is_one_line_with_the_hint(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    result = run_cli(["train", *TINY], cwd=tmp_path, env={"DAS_LAB_LOGS": str(tmp_path / "a_file")})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"das-lab: error: cannot write the run folder {tmp_path / 'a_file'}/outputs/")
    assert "hydra.run.dir=DIR" in line and "DAS_LAB_LOGS=DIR" in line


def test_internal_errors_keep_their_traceback(tmp_path):
    # BatchNorm's ValueError on a batch of one is a failure inside torch, not an input check of das-lab
    result = run_cli(["train", *TINY, "model=resnet_tiny", "data.batch_size=1"], cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" in result.stderr and "Expected more than 1 value per channel" in result.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert "Expected more than 1 value per channel" in (run_dir / "FAILED").read_text()
    assert f"das-lab: the traceback is also in {run_dir / 'FAILED'}" in result.stderr


def test_missing_arguments_are_named_together_and_leave_no_folder(tmp_path):
    result = run_cli(["visualize"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "das-lab: error: missing required values 'ckpt_path', 'images': pass ckpt_path=VALUE images=VALUE "
        "on the command line"
    )
    assert run_cli(["eval"], cwd=tmp_path).returncode == 2
    assert not (tmp_path / "outputs").exists()


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """Writing epoch 1's last.ckpt fails half-way with ENOSPC: epoch 0's last.ckpt stays valid."""
    import das_lab.atomic_io
    from das_lab.cli import main

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            path = Path(self.file.name)
            if path.name == ".last.ckpt.tmp" and path.with_name("last.ckpt").exists():
                self.file.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device", str(self.file.name))
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(das_lab.atomic_io, "open", lambda path, mode: FullDisk(open(path, mode)), raising=False)
    monkeypatch.setenv("DAS_LAB_LOGS", str(tmp_path))
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("trainer.max_epochs")]
    status = main(
        [
            "train",
            *args,
            "model=resnet_tiny",
            "trainer.max_epochs=2",
            "test=false",
            f"hydra.run.dir={run_dir}",
            "callbacks.model_checkpoint.save_top_k=-1",
        ]
    )  # every epoch saves, so epoch 1 writes last.ckpt
    assert status == 2
    assert f"das-lab: error: No space left on device: {run_dir / 'checkpoints'}" in capsys.readouterr().err
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert "ENOSPC" in (run_dir / "FAILED").read_text() or "No space left" in (run_dir / "FAILED").read_text()
    assert read_metrics(run_dir)["status"] == "failed"


def test_record_write_failure_never_leaves_an_empty_file(tmp_path, monkeypatch):
    import das_lab.atomic_io
    from das_lab.run import RunRecord

    record = RunRecord(tmp_path, [])
    record.failed(RuntimeError("first"))

    def no_space(path, mode):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(das_lab.atomic_io, "open", no_space, raising=False)
    with pytest.raises(OSError):
        record.failed(RuntimeError("second"))
    assert "RuntimeError: first" in (tmp_path / "FAILED").read_text()
    assert read_metrics(tmp_path)["error"] == "RuntimeError: first"
