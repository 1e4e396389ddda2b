"""``das-lab eval``: rebuild a checkpoint's model and data, evaluate it, write metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from das_lab.loggers import close_loggers
from das_lab.pipeline import (
    CONFIG_KEY,
    build_module,
    check_checkpoint_fits,
    instantiate_group,
    is_rank_zero,
    model_cost,
    read_checkpoint,
    scalar_metrics,
)
from das_lab.run import RunRecord

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def _data_config(stored: dict[str, Any], replacements: Optional[DictConfig]) -> DictConfig:
    data = OmegaConf.create(stored["data"])
    for key, value in (replacements or {}).items():
        if value is not None:
            data[key] = value
    return data


def _model_config(stored: dict[str, Any]) -> DictConfig:
    model = OmegaConf.create(stored["model"])
    if "checkpoint" in model:
        model.checkpoint = None  # the das-lab checkpoint carries the weights
    return model


def evaluate(cfg: DictConfig) -> Optional[float]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.splits``; returns the first split's first metric."""
    splits = list(cfg.splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"splits={splits}: unknown split(s) {unknown}; choose from {list(SPLITS)}")
    run_dir = Path(cfg.paths.output_dir)
    writer = is_rank_zero()
    record = RunRecord(run_dir, HydraConfig.get().overrides.task)
    loggers: list = []
    try:
        if writer:
            record.write_environment()
        checkpoint = read_checkpoint(cfg.ckpt_path)
        stored = checkpoint.get(CONFIG_KEY)
        if stored is None:
            raise ValueError(
                f"{cfg.ckpt_path} has no '{CONFIG_KEY}' entry: it was not written by `das-lab train`. "
                "Use init_from=<file> with `das-lab train` to start from foreign weights."
            )
        datamodule = instantiate(_data_config(stored, cfg.get("data")))
        net, module = build_module(_model_config(stored), stored["task"], stored["optimizer"], stored["scheduler"])
        check_checkpoint_fits(module, checkpoint, cfg.ckpt_path)
        module.load_state_dict(checkpoint["state_dict"])
        record.params, record.gflops = model_cost(net, getattr(datamodule, "image_size", None))
        loggers = instantiate_group(cfg.get("logger"))
        trainer = instantiate(cfg.trainer, logger=loggers or False)
        final: dict[str, float] = {}
        for split in splits:
            run = trainer.validate if split == "val" else trainer.test
            run(module, datamodule=datamodule)
            final.update(scalar_metrics(trainer, (f"{split}/",)))
        if writer:
            record.completed(final, final, str(Path(cfg.ckpt_path).expanduser().resolve()))
            log.info("run folder: %s (metrics.json)", run_dir)
        close_loggers(loggers, failed=False)
    except BaseException as error:
        if writer:
            record.failed(error)
        close_loggers(loggers, failed=True)
        raise
    return next(iter(final.values()), None)
