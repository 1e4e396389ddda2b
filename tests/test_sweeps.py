"""Sweeps: ablation grids and the SLURM/submitit launchers (the Optuna search: test_search.py)."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cli_helpers import TINY, read_metrics, run_cli
from das_lab.cli import _register_resolvers
from das_lab.config import config_dir

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
    assert cfg.model._target_ == "das_lab.models.dat.DAT" and cfg.data._target_.endswith("DigitsDataModule")
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
