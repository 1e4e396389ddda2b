"""Sweeps: ablation grids, the Optuna search (resumable, failures recorded) and the SLURM/submitit launchers."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cli_helpers import TINY, read_metrics, run_cli
from das_lab.cli import _register_resolvers
from das_lab.config import config_dir
from das_lab.sweeps import NanObjectiveFailsTrial, sqlite_storage

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
        "resnet": (None, []), "se": ("se", []), "cbam": ("cbam", []), "eca": ("eca", []), "gc": ("gc", []),
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
    cfg = compose_train("hydra/launcher=slurm", "trainer=gpu", "trainer.devices=4", "trainer.num_nodes=2",
                        "hydra.launcher.partition=gpu", "hydra.sweep.dir=/sweeps/x")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    layout = [launcher[k] for k in ("partition", "nodes", "tasks_per_node", "gpus_per_node")]
    assert layout == ["gpu", 2, 4, 4]
    assert launcher["max_num_timeout"] == 3 and launcher["timeout_min"] == 1440
    assert launcher["submitit_folder"] == "/sweeps/x/.submitit/%j"
    local = OmegaConf.to_container(compose_train("hydra/launcher=slurm_local", "hydra.sweep.dir=/s").hydra.launcher,
                                   resolve=True)
    assert local["_target_"].endswith("LocalLauncher") and local["tasks_per_node"] == 1 and local["nodes"] == 1


def test_optuna_direction_follows_monitor_mode(compose_train, tmp_path):
    cfg = compose_train("hparams_search=optuna", f"hydra.sweep.dir={tmp_path}/sweep")
    assert cfg.hydra.sweeper.direction == "maximize"
    minimising = compose_train("hparams_search=optuna", "monitor=val/loss", "monitor_mode=min")
    assert minimising.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "model.drop_path_rate"}
    assert instantiate(cfg.hydra.sweeper.storage) == f"sqlite:///{tmp_path}/sweep/optuna.db"
    assert (tmp_path / "sweep").is_dir()


def test_sqlite_storage_creates_its_folder(tmp_path):
    assert sqlite_storage(str(tmp_path / "a" / "b" / "s.db")) == f"sqlite:///{tmp_path}/a/b/s.db"
    assert (tmp_path / "a" / "b").is_dir()


def test_nan_objective_becomes_no_value():
    config = OmegaConf.create({"hydra": {"job": {"num": 3}}})
    callback = NanObjectiveFailsTrial()
    for value, expected in ((float("nan"), None), (0.5, 0.5)):
        job = JobReturn(status=JobStatus.COMPLETED, _return_value=value)
        callback.on_job_end(config, job)
        assert job.return_value == expected


def _trials(sweep):
    study = optuna.load_study(study_name="train", storage=f"sqlite:///{sweep}/optuna.db")
    return [(t.state.name, t.value, t.params) for t in study.trials]


@pytest.mark.slow
def test_optuna_search_resumes_and_records_failed_trials(tmp_path):
    args = ["train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "model=resnet_tiny", *FAST]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    trials = _trials(sweep)
    assert [state for state, _, _ in trials] == ["COMPLETE", "COMPLETE"]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    for (_, value, params), job in zip(trials, jobs):
        metrics = read_metrics(job)
        assert value == pytest.approx(metrics["best"]["val/acc1"])
        assert f"optimizer.lr={params['optimizer.lr']}" in metrics["overrides"]
        assert 1e-4 <= params["optimizer.lr"] <= 1e-2 and 0 <= params["model.drop_path_rate"] <= 0.3

    resumed = run_cli([*args, f"hydra.sweep.dir={sweep}", "data.digit_size=99"], cwd=tmp_path)
    assert resumed.returncode == 1  # the failed jobs are reported, after the search went on
    assert "Using an existing study with name 'train'" in resumed.stderr
    assert "2 job(s) of the sweep failed" in resumed.stderr
    trials = _trials(sweep)
    assert [state for state, _, _ in trials] == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(v for s, v, _ in trials if s == "COMPLETE"))
    statuses = sorted(json.loads((p / "metrics.json").read_text())["status"] for p in sweep.iterdir()
                      if (p / "metrics.json").is_file())
    assert statuses == ["completed", "completed", "failed", "failed"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_and_reports_failures(tmp_path):
    result = run_cli(["train", "-m", "hydra/launcher=slurm_local", "hydra.launcher.timeout_min=5", *FAST,
                      "data.digit_size=99,16"], cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # the failure happened in a submitit process
    assert "1 job(s) of the sweep failed" in result.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    failed, completed = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert read_metrics(failed)["status"] == "failed" and str(failed) in result.stderr
    metrics = read_metrics(completed)
    assert metrics["status"] == "completed" and math.isfinite(metrics["best"]["val/acc1"])
    submitit_dirs = [p for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()]  # <SLURM-style job ids>
    assert submitit_dirs and all(list(d.glob("*_log.out")) for d in submitit_dirs)
