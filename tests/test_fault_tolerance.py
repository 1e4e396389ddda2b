"""Killed runs resume exactly; bad checkpoints and config values fail with clear messages; DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import DAS_LAB, TINY, read_metrics, run_cli, run_console, run_dirs

pytestmark = pytest.mark.slow

# long enough epochs that a kill lands inside one; deterministic CPU mode
RESUMABLE = [
    *[arg for arg in TINY if not arg.startswith(("trainer.max_epochs", "trainer.limit_train"))],
    "model=resnet_tiny",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=40",
    "trainer.deterministic=true",
    "test=false",
]


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_killed_run_resumes_to_the_same_result(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = run_cli(["train", *RESUMABLE, f"hydra.run.dir={reference_dir}"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    # one thread like the runs in this process (tests/conftest.py): the same sums in the same order
    env = {**os.environ, "DAS_LAB_LOGS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [DAS_LAB, "train", *RESUMABLE, f"hydra.run.dir={killed_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "metrics.json").exists(), "the run finished before it could be killed"
    killed_epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert killed_epoch < 2

    resumed = run_cli(["train", *RESUMABLE, f"hydra.run.dir={killed_dir}", "ckpt_path=last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = read_metrics(reference_dir), read_metrics(killed_dir)
    for name in ("val/acc1", "val/loss", "train/loss"):
        assert got["final"][name] == pytest.approx(expected["final"][name], rel=1e-6), name
    assert got["best"] == pytest.approx(expected["best"], rel=1e-6)
    reference_state, resumed_state = _state(reference_dir), _state(killed_dir)
    assert reference_state.keys() == resumed_state.keys()
    for key, value in reference_state.items():
        assert torch.allclose(value.float(), resumed_state[key].float(), rtol=1e-5, atol=1e-7), key


def test_incompatible_checkpoint_lists_mismatches(tmp_path):
    trained = run_cli(["train", *TINY, "model=resnet_tiny", "test=false"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = run_dirs(tmp_path)[0] / "checkpoints" / "last.ckpt"
    result = run_cli(
        ["train", *TINY, "model=das_resnet_tiny", "data.num_classes=10", f"ckpt_path={checkpoint}"], cwd=tmp_path
    )
    assert result.returncode == 2
    assert "missing from the file: net.stage_gates" in result.stderr
    assert "hint: check that the file belongs to this architecture" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_model_value_names_the_key(tmp_path):
    result = run_cli(["train", *TINY, "model.offset_groups=3"], cwd=tmp_path)
    assert result.returncode == 2
    assert "model.offset_groups=3 does not divide" in result.stderr
    assert "Traceback" not in result.stderr


def test_ddp_two_processes_share_one_run_folder(tmp_path):
    args = [
        *TINY,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.limit_val_batches=null",
        "model=resnet_tiny",
    ]
    # its own process: rank 0 would otherwise leave this test process in a torch.distributed group
    result = run_console(["train", *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert sorted(p.name for p in (tmp_path / "outputs").glob("*/*")) == [run_dir.name]
    assert (
        "model ResNet" in (run_dir / "train_ddp_process_1.log").read_text()
        or "model DASResNet" in (run_dir / "train_ddp_process_1.log").read_text()
    )
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    # the logged val metrics cover the whole val set split over both ranks: one process agrees
    evaluated = run_cli(
        ["eval", f"ckpt_path={metrics['ckpt_best']}", "splits=[val]", "trainer.enable_progress_bar=false"], cwd=tmp_path
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    single = read_metrics(run_dirs(tmp_path)[-1])["final"]
    assert single["val/acc1"] == pytest.approx(metrics["final"]["val/acc1"], abs=1e-6)
    assert single["val/loss"] == pytest.approx(metrics["final"]["val/loss"], rel=1e-4)


def test_torchrun_ranks_share_one_run_folder(tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    args = [*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "model=resnet_tiny"]
    env = {**os.environ, "DAS_LAB_LOGS": str(tmp_path)}
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "das_lab.cli", "train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert run_dir.name.startswith("torchrun-")
    assert read_metrics(run_dir)["status"] == "completed"
    assert (run_dir / "rank_1.log").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()


def test_torchrun_without_run_id_is_refused(monkeypatch):
    from das_lab.cli import run_stamp
    from das_lab.errors import UserError

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--standalone or --rdzv-id=ID"):
        run_stamp("12-00-00.000001")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert run_stamp("12-00-00.000001") == "torchrun-job7"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    assert run_stamp("12-00-00.000001") == "12-00-00.000001_99"
