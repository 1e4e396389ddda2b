"""Sweeps: ablation grids and the SLURM/submitit launchers (the Optuna search: test_search.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cli_helpers import TINY, read_metrics, run_cli
from das_lab.cli import _register_resolvers
from das_lab.config import config_dir
from das_lab.run import RunRecord
from das_lab.slurm import record_ended_job
from das_lab.sweeps import MAX_DIRNAME, SWEPT_KEYS_ENV, SweepFolder, failed_jobs, job_dirname, swept_keys

# one training and one validation step per job, no test
FAST = [*TINY, "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false"]


@pytest.fixture()
def compose_train(tmp_path):
    _register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):

        def _compose(*overrides: str):
            return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides], return_hydra_config=True)

        yield _compose
    GlobalHydra.instance().clear()


def _swept_values(cfg, key: str) -> list[str]:
    return str(cfg.hydra.sweeper.params[key]).split(",")


def test_backbone_sweep_builds_each_baseline(compose_train):
    cfg = compose_train("+experiment=ablation_backbones")
    assert _swept_values(cfg, "backbone") == ["resnet", "se", "cbam", "eca", "gc", "das"]
    built = {}
    for backbone in _swept_values(cfg, "backbone"):
        model_cfg = compose_train("+experiment=ablation_backbones", f"backbone={backbone}").model
        built[backbone] = (model_cfg.attn_layer, list(model_cfg.gate_stages), instantiate(model_cfg))
    assert {name: spec[:2] for name, spec in built.items()} == {
        "resnet": (None, []),
        "se": ("se", []),
        "cbam": ("cbam", []),
        "eca": ("eca", []),
        "gc": ("gc", []),
        "das": (None, [2, 3]),
    }
    params = {name: sum(p.numel() for p in spec[2].parameters()) for name, spec in built.items()}
    assert all(params[name] > params["resnet"] for name in ("se", "cbam", "eca", "gc", "das"))


def test_dat_offset_sweep_sets_one_factor_each(compose_train):
    cfg = compose_train("+experiment=ablation_dat_offsets")
    assert cfg.model.name == "dat_nano" and cfg.data._target_.endswith("DigitsDataModule")
    settings = {}
    for variant in _swept_values(cfg, "dat_variant"):
        model = compose_train("+experiment=ablation_dat_offsets", f"dat_variant={variant}").model
        settings[variant] = OmegaConf.to_container(model, resolve=True)
    default = settings["default"]
    assert default["groups"] == [1, 1, 1, 2] and default["offset_range_factor"] == [-1, -1, -1, -1]
    assert settings["no_off"]["no_offs"] == [True] * 4
    assert settings["groups_heads"]["groups"] == settings["groups_heads"]["heads"] == [1, 2, 2, 4]
    assert settings["range_1234"]["offset_range_factor"] == [1, 2, 3, 4]
    for variant, values in settings.items():
        changed = {k for k in ("groups", "no_offs", "offset_range_factor") if values[k] != default[k]}
        assert len(changed) == (0 if variant == "default" else 1), variant
    instantiate(compose_train("+experiment=ablation_dat_offsets", "dat_variant=groups_heads").model)


def test_slurm_launcher_follows_the_trainer(compose_train):
    cfg = compose_train(
        "hydra/launcher=slurm",
        "trainer=gpu",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.sweep.dir=/sweeps/x",
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.das_lab_launchers.submitit_launchers.SlurmLauncher"
    layout = [launcher[k] for k in ("partition", "nodes", "tasks_per_node", "gpus_per_node")]
    assert layout == ["gpu", 2, 4, 4]
    assert launcher["max_num_timeout"] == 3 and launcher["timeout_min"] == 1440
    assert launcher["submitit_folder"] == "/sweeps/x/.submitit/%j"
    local = OmegaConf.to_container(
        compose_train("hydra/launcher=slurm_local", "hydra.sweep.dir=/s").hydra.launcher, resolve=True
    )
    assert local["_target_"].endswith("LocalLauncher") and local["tasks_per_node"] == 1 and local["nodes"] == 1


def test_swept_keys_come_from_the_command_line_and_the_sweeper_params(compose_train, monkeypatch):
    cfg = compose_train("+experiment=ablation_backbones", "seed=1")
    cfg.hydra.overrides.task.append("optimizer.lr=1e-3,2e-3")  # as `-m` hands it to the sweep
    assert swept_keys(cfg) == ["backbone", "optimizer.lr"]
    monkeypatch.delenv(SWEPT_KEYS_ENV, raising=False)
    SweepFolder().on_multirun_start(cfg)
    assert os.environ[SWEPT_KEYS_ENV] == "backbone,optimizer.lr" and SweepFolder.last == Path(cfg.hydra.sweep.dir)


def test_job_folder_names_start_with_the_swept_values_and_end_in_a_hash(monkeypatch):
    monkeypatch.setenv(SWEPT_KEYS_ENV, "optimizer.lr")
    constant = ",".join(f"data.option_{i}=value_{i}" for i in range(12))
    names = [job_dirname(f"{constant},optimizer.lr={lr},trainer.max_epochs=1") for lr in ("0.001", "0.002")]
    assert names[0].startswith("optimizer.lr=0.001,option_0=value_0,option_1=value_1")
    assert names[1].startswith("optimizer.lr=0.002,")
    assert all(len(name) == MAX_DIRNAME for name in names) and names[0][-10:] != names[1][-10:]
    assert job_dirname("model=resnet,+experiment=x,tags=[a,b]") == "model=resnet,+experiment=x,tags=[a,b]"
    monkeypatch.setenv(SWEPT_KEYS_ENV, "")
    assert job_dirname("data.digit_size=16") == "digit_size=16" and job_dirname("") == ""


def test_failed_jobs_are_absolute_paths(tmp_path, monkeypatch):
    job = tmp_path / "multirun" / "d" / "t" / "0_x=1"
    job.mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps({"status": "failed"}))
    monkeypatch.chdir(tmp_path)
    assert failed_jobs(Path("multirun/d/t")) == [str(job)]


@pytest.mark.slow
def test_failure_summary_counts_each_job_once_with_a_relative_log_folder(tmp_path):
    result = run_cli(
        ["train", "-m", "hydra/launcher=basic", *FAST, "data.digit_size=99", "seed=1,2"],
        cwd=tmp_path,
        env={"DAS_LAB_LOGS": "."},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "2 job(s) of the sweep failed" in result.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [name.split(",")[0] for name in jobs] == ["0_seed=1", "1_seed=2"]
    assert sum(line.strip().endswith(jobs[0]) for line in result.stderr.splitlines()) == 1


def test_job_that_slurm_ended_is_recorded_failed_keeping_what_its_attempts_measured(tmp_path):
    job = tmp_path / "0_x=1"
    job.mkdir()
    RunRecord(job, ["x=1"]).requeued({"val/acc1": 0.5})
    earlier = read_metrics(job)
    assert earlier["status"] == "requeued" and not (job / "FAILED").exists()
    record_ended_job(job, ["x=1"], "7_0", "CANCELLED", tmp_path / "7_0_0_log.err")
    metrics = read_metrics(job)
    assert (metrics["status"], metrics["slurm_state"], metrics["best"]) == ("failed", "CANCELLED", {"val/acc1": 0.5})
    assert metrics["wall_time_s"] >= earlier["wall_time_s"]
    assert "SLURM ended job 7_0 with state CANCELLED" in (job / "FAILED").read_text()
    done = tmp_path / "1_x=2"
    done.mkdir()
    RunRecord(done, ["x=2"]).completed({"val/acc1": 0.7}, {"val/acc1": 0.7}, None)
    record_ended_job(done, ["x=2"], "7_1", "COMPLETED", tmp_path / "7_1_0_log.err")
    assert read_metrics(done)["status"] == "completed" and not (done / "FAILED").exists()


def test_resumed_attempt_of_a_requeued_job_counts_the_earlier_wall_time(tmp_path):
    first = RunRecord(tmp_path, [])
    first.started -= 30.0  # the first attempt ran 30 s before SLURM requeued it
    first.requeued({"val/acc1": 0.5})
    RunRecord(tmp_path, []).completed({}, {"val/acc1": 0.6}, None)
    metrics = read_metrics(tmp_path)
    assert metrics["status"] == "completed" and 30.0 <= metrics["wall_time_s"] < 60.0
