"""Every config file composes and its objects instantiate, so a broken config cannot land."""

from __future__ import annotations

import inspect
import re

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object, instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import OmegaConf

from das_lab.cli import _register_resolvers
from das_lab.config import config_dir
from das_lab.pipeline import build_module, instantiate_group

CONF = config_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS if g not in ("experiment", "hydra") for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.fixture()
def composer(tmp_path):
    _register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):

        def _compose(*overrides: str, return_hydra_config: bool = False):
            base = [f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}/data"]
            return compose("train", overrides=[*base, *overrides], return_hydra_config=return_hydra_config)

        yield _compose
    GlobalHydra.instance().clear()


def _without_checkpoint(model_cfg):
    model_cfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    if "checkpoint" in model_cfg:
        model_cfg.checkpoint = None  # weights files are not shipped; loading is tested with the models
    return model_cfg


def test_config_groups_are_complete():
    assert set(GROUPS) >= {
        "data",
        "model",
        "task",
        "optimizer",
        "scheduler",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "experiment",
        "hparams_search",
        "hydra",
        "recipe",
    }


def test_targets_take_exactly_the_yaml_keys():
    """A ``_target_`` class must accept every key of its YAML (no silent extra keys)."""
    for path in sorted(CONF.rglob("*.yaml")):
        node = OmegaConf.load(path)
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            continue
        target = get_object(node._target_)
        signature = inspect.signature(target.__init__ if inspect.isclass(target) else target)
        if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            continue
        keys = {k for k in node if not k.startswith("_")}
        assert keys <= set(signature.parameters), (
            f"{path.relative_to(CONF)}: {sorted(keys - set(signature.parameters))}"
        )


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_group_option_composes_and_instantiates(composer, group, option):
    cfg = composer(f"{group}={option}")
    if group == "data":
        datamodule = instantiate(cfg.data)
        assert isinstance(datamodule, L.LightningDataModule) and datamodule.num_classes == cfg.data.num_classes
    elif group == "model":
        net = instantiate(_without_checkpoint(cfg.model), num_classes=3)
        assert net.num_classes == 3 and net.pretrained_cfg["architecture"] == cfg.model.name  # a timm model
        assert len(net.feature_info) >= 4 and callable(net.forward_intermediates)
    elif group in ("optimizer", "scheduler"):
        assert callable(instantiate(cfg[group]))
    elif group == "callbacks":
        assert all(isinstance(c, L.Callback) for c in instantiate_group(cfg.callbacks))
    elif group == "logger":
        assert all(isinstance(lg, Logger) for lg in instantiate_group(cfg.logger))
    elif group == "trainer":
        trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_checkpointing=False)
        assert isinstance(trainer, L.Trainer)
    elif group == "task":
        extra = ["data=coco", "model=resnet_tiny", "model.num_classes=0"] if option == "detection" else []
        cfg = composer(f"task={option}", *extra)
        _, module = build_module(cfg.model, cfg.task, cfg.optimizer, cfg.get("scheduler"))
        assert isinstance(module, L.LightningModule)
    elif group == "recipe":
        cfg = composer(f"recipe={option}", "data=stanford_dogs")
        assert instantiate(cfg.data).train_transform is not None
        mixup = instantiate(cfg.task.mixup) if cfg.task.mixup is not None else None
        assert mixup is None or mixup.num_classes == cfg.data.num_classes
    elif group == "paths":
        assert cfg.paths.data_dir.endswith("/data") and cfg.paths.output_dir
    elif group == "hparams_search":
        sweeper = composer(f"hparams_search={option}", return_hydra_config=True).hydra.sweeper
        assert "optuna" in sweeper._target_.lower() and len(sweeper.params) >= 3
    else:
        pytest.fail(f"no check for config group {group}")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(composer, name):
    cfg = composer(f"+experiment={name}")
    datamodule = instantiate(cfg.data)
    model_cfg = _without_checkpoint(cfg.model)
    _, module = build_module(model_cfg, cfg.task, cfg.optimizer, cfg.get("scheduler"))
    assert isinstance(module, L.LightningModule)
    assert datamodule.num_classes == cfg.data.num_classes
    assert all(isinstance(c, L.Callback) for c in instantiate_group(cfg.callbacks))
    assert all(isinstance(lg, Logger) for lg in instantiate_group(cfg.logger))


def test_hydra_run_and_sweep_folders(composer):
    cfg = composer(return_hydra_config=True)
    assert re.search(r"/outputs/\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}\.\d{6}$", cfg.hydra.run.dir), cfg.hydra.run.dir
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep["subdir"] == "${hydra.job.num}_${das_lab_short:${hydra.job.override_dirname}}"
    assert cfg.hydra.job.chdir is False
