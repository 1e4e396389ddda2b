"""``das-lab eval``: rebuild a checkpoint's model and data, evaluate it, write metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from das_lab.loggers import close_loggers
from das_lab.pipeline import (
    instantiate_group,
    is_rank_zero,
    model_cost,
    restore_checkpoint,
    scalar_metrics,
)
from das_lab.run import RunRecord

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


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
        data_cfg, net, module = restore_checkpoint(cfg.ckpt_path, cfg.get("data"))
        datamodule = instantiate(data_cfg)
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
