"""The das-lab command end to end: train, eval, sweeps, outputs and error messages."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from cli_helpers import TINY, read_metrics, run_cli, run_dirs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run shared by the tests that inspect its outputs."""
    root = tmp_path_factory.mktemp("train")
    result = run_cli(["train", *TINY], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(root)
    return root, run_dir, result


def test_help_lists_subcommands(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    for command in ("train", "eval", "data", "profile", "report", "visualize", "export", "predict"):
        assert f"\n  {command} " in result.stdout


def test_unknown_command_is_one_line(tmp_path):
    result = run_cli(["fit"], cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "das-lab: unknown command 'fit'; choose from: train, eval, data, profile, report, visualize, export, predict"
    )


def test_train_writes_run_folder(trained):
    _, run_dir, result = trained
    assert str(run_dir) in result.stdout + result.stderr
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed"
    assert set(metrics) >= {"status", "final", "best", "params", "gflops", "overrides", "wall_time_s", "ckpt_best"}
    for name in ("train/loss", "val/loss", "val/acc1", "val/acc5", "test/acc1", "test/acc5"):
        assert name in metrics["final"], name
    for name in ("val/acc1", "val/acc5", "test/acc1"):
        assert 0.0 <= metrics["final"][name] <= 1.0
    assert metrics["best"]["val/acc1"] == pytest.approx(metrics["final"]["val/acc1"])
    assert metrics["params"] > 1000 and metrics["gflops"] > 0
    assert metrics["overrides"] == TINY
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert metrics["ckpt_best"] and (run_dir / "checkpoints").joinpath(metrics["ckpt_best"]).is_file()
    assert (run_dir / "csv" / "metrics.csv").read_text().startswith("epoch,step")
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["data"]["image_size"] == 32
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["packages"]["torch"].startswith("2.14.1")
    assert info["git"] is None or len(info["git"]["commit"]) == 40
    assert not (run_dir / "FAILED").exists()


def test_checkpoint_loads_with_weights_only_and_carries_config(trained):
    _, run_dir, _ = trained
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["das_lab_config"]["data"]["image_size"] == 32
    assert any(key.startswith("net.") for key in checkpoint["state_dict"])


def test_eval_reproduces_logged_val_metrics(trained):
    root, run_dir, _ = trained
    metrics = read_metrics(run_dir)
    limits = [arg for arg in TINY if arg.startswith(("trainer.limit_val", "trainer.limit_test"))]
    result = run_cli(
        ["eval", f"ckpt_path={metrics['ckpt_best']}", "trainer.enable_progress_bar=false", *limits], cwd=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    eval_dir = run_dirs(root)[-1]
    assert eval_dir != run_dir
    evaluated = read_metrics(eval_dir)
    assert evaluated["status"] == "completed"
    for name in ("val/acc1", "val/acc5", "val/loss", "test/acc1", "test/acc5"):
        assert evaluated["final"][name] == pytest.approx(metrics["final"][name], rel=1e-5, abs=1e-6), name
    assert evaluated["params"] == metrics["params"]


def test_multirun_two_jobs(tmp_path):
    result = run_cli(["train", "-m", "hydra/launcher=basic", "seed=1,2", *TINY, "test=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "multirun").glob("*/*/*") if (p / "metrics.json").is_file())
    assert [p.name[:2] for p in jobs] == ["0_", "1_"]
    assert all(len(p.name) <= 2 + 120 + 11 for p in jobs)  # long override lists end in a hash
    assert [read_metrics(p)["overrides"][0] for p in jobs] == ["seed=1", "seed=2"]
    for job in jobs:
        assert read_metrics(job)["status"] == "completed"
        assert (job / ".hydra" / "overrides.yaml").is_file()


def test_failing_job_does_not_stop_the_sweep(tmp_path):
    result = run_cli(
        ["train", "-m", "hydra/launcher=basic", *TINY, "data.digit_size=99,16", "test=false"], cwd=tmp_path
    )
    assert result.returncode == 1
    assert "1 job(s) of the sweep failed" in result.stderr
    failed, completed = sorted((tmp_path / "multirun").glob("*/*/[01]_*"))
    assert read_metrics(failed)["status"] == "failed"
    assert "digit_size" in (failed / "FAILED").read_text()
    assert read_metrics(completed)["status"] == "completed"


def test_input_error_is_one_line_and_leaves_no_run_folder(tmp_path):
    result = run_cli(["train", *TINY, "data.digit_size=99"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "data.digit_size=99 must lie between 8" in result.stderr
    assert not (tmp_path / "outputs").exists()  # nothing ran; a sweep job keeps its FAILED (test above)


def test_unknown_config_option_lists_available(tmp_path):
    result = run_cli(["train", "model=no_such_model"], cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'model/no_such_model'" in result.stderr
    assert "Available options in 'model'" in result.stderr and "resnet_tiny" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_required_value(tmp_path):
    result = run_cli(["eval"], cwd=tmp_path)
    assert result.returncode == 2
    assert "missing required value 'ckpt_path': pass ckpt_path=VALUE" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_checkpoint(tmp_path):
    result = run_cli(["eval", "ckpt_path=nowhere/model.ckpt"], cwd=tmp_path)
    assert result.returncode == 2
    assert "checkpoint not found: nowhere/model.ckpt" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_last_without_checkpoint_explains(tmp_path):
    result = run_cli(["train", *TINY, "ckpt_path=last"], cwd=tmp_path)
    assert result.returncode == 2
    assert "hydra.run.dir=<run folder> ckpt_path=last" in result.stderr


def test_cfg_job_prints_composed_config(tmp_path):
    result = run_cli(["train", "--cfg", "job", "model=resnet_tiny", "optimizer.lr=0.5"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["optimizer"]["lr"] == 0.5
    assert config["data"]["_target_"] == "das_lab.data.digits.DigitsDataModule"
    assert not (tmp_path / "outputs").exists()


def test_user_config_dir_adds_options(tmp_path):
    own = tmp_path / "my_conf" / "model"
    own.mkdir(parents=True)
    (own / "my_net.yaml").write_text("_target_: my_package.Net\nwidth: 7\n")
    result = run_cli(["train", "--config-dir", str(tmp_path / "my_conf"), "model=my_net", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"] == {"_target_": "my_package.Net", "width": 7}


def test_run_dir_is_sub_second_and_carries_slurm_id(tmp_path):
    result = run_cli(["train", *TINY, "test=false"], cwd=tmp_path, env={"SLURM_JOB_ID": "4242"})
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    time_part, job = run_dir.name.split("_")
    assert job == "4242"
    assert len(time_part.split(".")[-1]) == 6  # microseconds: jobs started in the same second differ


def test_hydra_run_dir_override(tmp_path):
    target = tmp_path / "my_run"
    result = run_cli(["train", *TINY, "test=false", f"hydra.run.dir={target}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(target)
    assert metrics["status"] == "completed" and math.isfinite(metrics["final"]["val/loss"])
