"""``das-lab train``: fit a model, test its best checkpoint; the run wrapper writes metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from das_lab.callbacks.checkpoint_state import ClassesInCheckpoint, ConfigInCheckpoint, RngStateInCheckpoint
from das_lab.callbacks.progress import ProgressBar
from das_lab.callbacks.skipped_images import SkippedImagesReport
from das_lab.command import Outcome, Run
from das_lab.loggers import WandbIdInCheckpoint, with_resumed_wandb_id
from das_lab.models.weights import load_weights
from das_lab.pipeline import (
    build_module,
    check_checkpoint_fits,
    instantiate_group,
    model_cost,
    read_checkpoint,
    scalar_metrics,
    stored_config,
)
from das_lab.run import MetricHistory
from das_lab.tasks.base import monitored_declarations, task_metrics

log = logging.getLogger(__name__)


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint that ``ckpt_path=last`` resumes from."""
    return run_dir / "checkpoints" / "last.ckpt"


def resolve_resume_path(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """``last``: this run folder's ``checkpoints/last.ckpt``; ``auto``: the same when it exists (a
    requeued job), else a fresh start; other values are paths."""
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "auto"):
        path = last_checkpoint(run_dir)
        if ckpt_path == "auto" and not path.is_file():
            return None
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last: no {path}. To resume a run, point at its folder: "
                f"hydra.run.dir=<run folder> ckpt_path=last"
            )
        return str(path)
    if not Path(ckpt_path).expanduser().is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(Path(ckpt_path).expanduser())


def train(cfg: DictConfig, run: Run) -> Outcome:
    """Run one training job; its objective (best ``cfg.monitor``, judged by ``cfg.monitor_mode``) goes to sweepers."""
    run.resume_checkpoint = last_checkpoint(run.dir)
    L.seed_everything(cfg.seed, workers=True)
    resume_from = resolve_resume_path(cfg.get("ckpt_path"), run.dir)
    resume_state = read_checkpoint(resume_from) if resume_from else None
    datamodule = instantiate(cfg.data)
    net, module = build_module(cfg.model, cfg.task, cfg.optimizer, cfg.get("scheduler"))
    owner = type(module).__name__
    declared = monitored_declarations(task_metrics(module), cfg.monitor, cfg.monitor_mode, owner)
    history = MetricHistory(declared, owner)
    run.measured = history.best
    if cfg.get("init_from"):
        load_weights(net, cfg.init_from, strict=False)
    if resume_state is not None:
        check_checkpoint_fits(module, resume_state, resume_from)
    record = run.record
    record.declared = declared
    record.params, record.gflops = model_cost(net, module, cfg.get("flops_image_size"))
    log.info("model %s: %.2fM params, %s GFLOPs", type(net).__name__, record.params / 1e6, record.gflops)
    run.loggers = instantiate_group(with_resumed_wandb_id(cfg.get("logger"), resume_state))
    stored = stored_config(cfg)
    callbacks = [
        *instantiate_group(cfg.get("callbacks")),
        history,
        ConfigInCheckpoint(stored),
        ClassesInCheckpoint(),
        SkippedImagesReport(),
        RngStateInCheckpoint(),
        WandbIdInCheckpoint(run.loggers),
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(ProgressBar(metrics_every_n_steps=cfg.trainer.get("log_every_n_steps", 50)))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=run.loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams({**stored, "params": record.params, "gflops": record.gflops})
    run.start()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    final = scalar_metrics(trainer, ("train/", "val/"))
    checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
    best_path = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule, ckpt_path=best_path, weights_only=True)
        final.update(scalar_metrics(trainer, ("test/",)))
    return Outcome(final, history.best(), best_path, history.best().get(cfg.monitor))
