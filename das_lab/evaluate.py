"""``das-lab eval``: rebuild a checkpoint's model and data and evaluate it; the run wrapper writes metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from das_lab.callbacks.skipped_images import SkippedImagesReport
from das_lab.command import Outcome, Run
from das_lab.errors import ConfigError
from das_lab.pipeline import instantiate_group, model_cost, restore_checkpoint, scalar_metrics
from das_lab.tasks.base import metric_declarations, task_metrics

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def evaluate(cfg: DictConfig, run: Run) -> Outcome:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.splits``; the objective is the first split's first metric."""
    splits = list(cfg.splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"splits={splits}: unknown split(s) {unknown}; choose from {list(SPLITS)}")
    restored = restore_checkpoint(cfg.ckpt_path, cfg.get("data"))
    datamodule = instantiate(restored.data)
    run.record.params, run.record.gflops = model_cost(restored.net, restored.module, restored.flops_image_size)
    run.record.declared = metric_declarations(task_metrics(restored.module))
    run.loggers = instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=[SkippedImagesReport()], logger=run.loggers or False)
    run.start()
    final: dict[str, float] = {}
    for split in splits:
        evaluate_split = trainer.validate if split == "val" else trainer.test
        evaluate_split(restored.module, datamodule=datamodule)
        final.update(scalar_metrics(trainer, (f"{split}/",)))
    return Outcome(final, final, str(Path(cfg.ckpt_path).expanduser().resolve()), next(iter(final.values()), None))
