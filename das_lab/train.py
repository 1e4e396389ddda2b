"""``das-lab train``: fit a model, test its best checkpoint, write metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from das_lab.pipeline import (
    ConfigInCheckpoint,
    build_module,
    instantiate_callbacks,
    instantiate_loggers,
    model_cost,
    scalar_metrics,
    stored_config,
)
from das_lab.run import MetricHistory, RunRecord

log = logging.getLogger(__name__)


def resolve_resume_path(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """``last`` means this run folder's ``checkpoints/last.ckpt``; other values are paths."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        path = run_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last: no {path}. To resume a run, point at its folder: "
                f"hydra.run.dir=<run folder> ckpt_path=last"
            )
        return str(path)
    if not Path(ckpt_path).expanduser().is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(Path(ckpt_path).expanduser())


def train(cfg: DictConfig) -> Optional[float]:
    """Run one training job; returns the best value of ``cfg.monitor`` for sweepers."""
    run_dir = Path(cfg.paths.output_dir)
    record = RunRecord(run_dir, HydraConfig.get().overrides.task)
    history = MetricHistory()
    trainer: Optional[L.Trainer] = None
    try:
        record.write_environment()
        L.seed_everything(cfg.seed, workers=True)
        resume_from = resolve_resume_path(cfg.get("ckpt_path"), run_dir)
        datamodule = instantiate(cfg.data)
        net, module = build_module(cfg.model, cfg.task, cfg.optimizer, cfg.get("scheduler"))
        record.params, record.gflops = model_cost(net, cfg.get("flops_image_size"))
        log.info("model %s: %.2fM params, %s GFLOPs", type(net).__name__, record.params / 1e6, record.gflops)
        callbacks = [*instantiate_callbacks(cfg.get("callbacks")), history, ConfigInCheckpoint(stored_config(cfg))]
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_loggers(cfg.get("logger")) or False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        final = scalar_metrics(trainer, ("train/", "val/"))
        checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        best_path = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
        if cfg.get("test"):
            trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True)
            final.update(scalar_metrics(trainer, ("test/",)))
        if trainer.is_global_zero:
            record.completed(final, history.best(), best_path)
            log.info("run folder: %s (metrics.json, checkpoints/, csv/)", run_dir)
    except BaseException as error:
        if trainer is None or trainer.is_global_zero:
            record.failed(error, history.best())
        raise
    return history.best().get(cfg.monitor)
