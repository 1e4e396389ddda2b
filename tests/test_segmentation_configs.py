"""The ADE20K experiments compose to the official recipes, and their schedules run in iterations."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from das_lab.cli import _register_resolvers
from das_lab.config import config_dir


@pytest.fixture()
def experiment(tmp_path):
    _register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield lambda name: compose("train", overrides=[f"+experiment={name}", f"paths.output_dir={tmp_path}"])
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    ("name", "model", "drop_path"), [("tiny", "dat_tiny", 0.3), ("small", "dat_small", 0.5), ("base", "dat_base", 0.7)]
)
def test_upernet_dat_recipes(experiment, name: str, model: str, drop_path: float) -> None:
    cfg = experiment(f"ade20k_upernet_dat_{name}")
    assert cfg.model.name == model and cfg.model.drop_path_rate == drop_path and cfg.model.num_classes == 0
    assert cfg.model.out_norms is True
    assert (cfg.task.head, cfg.task.channels, cfg.task.aux_channels, cfg.task.aux_weight) == ("upernet", 512, 256, 0.4)
    assert list(cfg.task.pool_scales) == [1, 2, 3, 6] and cfg.task.inference == "whole"
    assert (cfg.optimizer.opt, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adamw", 6e-5, 0.01)
    assert (cfg.scheduler.sched, cfg.scheduler.decay_rate, cfg.scheduler.warmup_epochs) == ("poly", 1.0, 1500)
    assert cfg.scheduler.warmup_lr == pytest.approx(6e-5 * 1e-6) and cfg.scheduler.min_lr == 0.0
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (-1, 160000, 16000)
    assert cfg.data.batch_size * cfg.trainer.devices == 16 and cfg.trainer.sync_batchnorm
    assert list(cfg.data.scale) == [2048, 512] and list(cfg.task.test_scale) == [2048, 512]
    assert (cfg.data.crop_size, cfg.data.cat_max_ratio) == (512, 0.75) and cfg.monitor == "val/miou"


def test_semantic_fpn_recipe(experiment) -> None:
    cfg = experiment("ade20k_fpn_dat_tiny")
    assert (cfg.task.head, cfg.task.channels, cfg.task.neck_channels, cfg.task.aux_weight) == ("fpn", 128, 256, 0.0)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.scheduler.decay_rate) == (2e-4, 1e-4, 0.9)
    assert cfg.scheduler.warmup_epochs == 0 and cfg.model.drop_path_rate == 0.4
    # mmseg's 80k iterations at batch 16, as the official code runs them: 40k at batch 32
    assert cfg.trainer.max_steps * cfg.data.batch_size == 80000 * 16


def test_das_comparison_differs_only_in_the_model(experiment) -> None:
    das, plain = (OmegaConf.to_container(experiment(f"ade20k_upernet_{m}"), resolve=False) for m in ("das_r50", "r50"))
    assert {key for key in das if das[key] != plain[key]} == {"model", "tags"}
    assert das["model"]["gate_stages"] == [3] and plain["model"]["gate_stages"] == []
    assert plain["optimizer"]["lr"] == 0.01 and plain["scheduler"]["decay_rate"] == 0.9
