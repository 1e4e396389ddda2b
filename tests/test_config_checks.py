"""The checks every command's config passes before it runs: every shipped config passes them, and
typical mistakes are refused naming the key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from das_lab.cli import _register_resolvers
from das_lab.config import check_config, config_dir
from das_lab.errors import ConfigError

EXPERIMENTS = sorted(path.stem for path in (config_dir() / "experiment").glob("*.yaml"))
COMMANDS = [
    ("train", ["callbacks=ema", "logger=tensorboard", "hparams_search=optuna", "trainer=ddp"]),
    ("profile", []),
    ("eval", ["ckpt_path=x.ckpt"]),
    ("visualize", ["ckpt_path=x.ckpt", "images=[a.png]"]),
    ("export", ["ckpt_path=x.ckpt", "out=hub"]),
    ("predict", ["ckpt_path=x.ckpt", "inputs=photos"]),
]


def _checked(config_name: str, overrides: list[str]) -> None:
    _register_resolvers()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        choices = cfg.hydra.runtime.choices
        with open_dict(cfg):
            del cfg["hydra"]
            cfg.paths.output_dir = "run"
        check_config(cfg, overrides, choices)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_passes(experiment):
    _checked("train", [f"+experiment={experiment}"])


@pytest.mark.parametrize("config_name, overrides", COMMANDS)
def test_every_command_config_passes(config_name, overrides):
    _checked(config_name, overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.num_workers=two"], r"data.num_workers='two': expected int \(argument 'num_workers' of "),
        (["+data.image_sise=32"], r"data.image_sise: not an argument of .*DigitsDataModule; did you mean image_size\?"),
        (["+data.zzz=3"], r"data.zzz: not an argument of .*DigitsDataModule; its arguments: .*image_size"),
        (
            ["+trainer.max_epoch=1"],
            r"trainer.max_epoch: not an argument of lightning.Trainer; did you mean max_epochs\?",
        ),
        (["+foo=bar"], r"\+foo=bar: no das-lab config reads 'foo'"),
        (["ckpt_path=???"], r"missing required value 'ckpt_path': pass ckpt_path=VALUE"),
    ],
)
def test_mistakes_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _checked("train", overrides)
