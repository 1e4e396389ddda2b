"""Building blocks shared by ``das-lab train`` and ``das-lab eval``: config -> Lightning objects."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, NamedTuple, Optional

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from das_lab.callbacks.checkpoint_state import CLASSES_KEY, CONFIG_KEY
from das_lab.errors import CheckpointError
from das_lab.models.weights import WeightsMismatchError, compare_state_dicts, read_torch_file
from das_lab.utils.flops import cost_subject, count_gmacs, count_params

log = logging.getLogger(__name__)

# Checkpoints of das-lab 0.1 name the family class as the model target, with every constructor argument
# spelled out. Today every model config targets the builder: those arguments override the family's
# base variant, which rebuilds the same network.
LEGACY_MODEL_TARGETS = {
    "das_lab.models.das_resnet.DASResNet": "daslab_resnet50",
    "das_lab.models.dat.DAT": "dat_tiny",
    "das_lab.models.das_mobilenet.DASMobileNetV2": "das_mobilenet_v2",
}
BUILDER_TARGET = "das_lab.models.builder.create_model"

STORED_GROUPS = ("data", "model", "task", "optimizer", "scheduler")


def stored_config(cfg: DictConfig) -> dict[str, Any]:
    """The part of a run's config that describes the model and its data, fully resolved."""
    stored = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) is not None else None
        for key in STORED_GROUPS
    }
    stored["flops_image_size"] = cfg.get("flops_image_size")
    return stored


def is_rank_zero() -> bool:
    """True in the process that writes a run's files (the only one outside distributed runs)."""
    return rank_zero_only.rank == 0


def instantiate_group(cfg: Optional[DictConfig]) -> list[Any]:
    """Every ``_target_`` node of a group of named objects (callbacks, loggers), in config order."""
    return [instantiate(node) for node in (cfg or {}).values() if node is not None and "_target_" in node]


def build_module(
    model_cfg: Any, task_cfg: Any, optimizer_cfg: Any, scheduler_cfg: Any
) -> tuple[nn.Module, L.LightningModule]:
    """Instantiate the backbone, then the task module around it."""
    net = instantiate(model_cfg)
    optimizer = instantiate(optimizer_cfg) if optimizer_cfg is not None else None
    scheduler = instantiate(scheduler_cfg) if scheduler_cfg is not None else None
    module = instantiate(task_cfg, net=net, optimizer=optimizer, scheduler=scheduler)
    return net, module


def model_cost(net: nn.Module, module: L.LightningModule, image_size: Optional[int]) -> tuple[int, Optional[float]]:
    """Parameters and GFLOPs (GMACs at batch 1) for metrics.json, of what ``cost_subject`` picks (a segmentor at its test scale)."""
    network, size = cost_subject(net, module, image_size)
    params = count_params(network)
    if size is None:
        return params, None
    try:
        return params, round(count_gmacs(network, (1, 3, *size)), 4)
    except Exception as exc:  # a model that cannot run on a bare image (e.g. needs targets) has no GFLOPs
        log.warning("GFLOPs not counted for %s at %dx%d px: %s", type(network).__name__, size[1], size[0], exc)
        return params, None


def scalar_metrics(trainer: L.Trainer, prefixes: tuple[str, ...]) -> dict[str, Optional[float]]:
    """The trainer's current logged metrics with the given prefixes, as plain floats.

    Lightning's ``_step``/``_epoch`` twins of a metric logged both ways are left out: the plain
    name holds the epoch value. NaN, an undefined value (e.g. the AP of an empty size range),
    becomes None, which metrics.json writes as null.
    """
    metrics = {
        name: float(value)
        for name, value in sorted(trainer.callback_metrics.items())
        if name.startswith(prefixes) and not name.endswith(("_step", "_epoch")) and torch.as_tensor(value).numel() == 1
    }
    return {name: None if math.isnan(value) else value for name, value in metrics.items()}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A das-lab checkpoint as a dict; a missing, truncated or pickled file is a clear error."""
    checkpoint = read_torch_file(
        path,
        "checkpoint",
        "check ckpt_path: das-lab reads the checkpoints `das-lab train` writes (runs keep theirs "
        "in <run>/checkpoints/); use init_from=<file> for plain weights",
    )
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def check_checkpoint_fits(module: L.LightningModule, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Fail before training or evaluating when a checkpoint was made for another network."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no 'state_dict'); use init_from=<file> for plain weights"
        )
    report = compare_state_dicts(module.state_dict(), state, str(path))
    if not report.clean:
        raise WeightsMismatchError(report)


def index_names(num_classes: int) -> list[str]:
    """Stand-in class names (``class_0``, ...) where a model's real ones are unknown."""
    return [f"class_{index}" for index in range(num_classes)]


class Restored(NamedTuple):
    """What a das-lab checkpoint rebuilds: its data config, backbone, task module, GFLOPs input size and the
    classes it stores (``names``, and ``category_ids`` for COCO detection)."""

    data: DictConfig
    net: nn.Module
    module: L.LightningModule
    flops_image_size: Optional[int]
    classes: Optional[dict[str, list]] = None

    def class_names(self, num_classes: int) -> list[str]:
        """The stored class names; index names, with a note, for checkpoints written before das-lab stored them."""
        names = list((self.classes or {}).get("names", []))
        if len(names) == num_classes:
            return names
        stored = f"{len(names)} class names for {num_classes} classes" if names else "no class names (an older das-lab)"
        log.warning("the checkpoint stores %s: classes are named class_0 ... class_%d", stored, num_classes - 1)
        return index_names(num_classes)


def restore_checkpoint(ckpt_path: str | Path, data_replacements: Optional[DictConfig] = None) -> Restored:
    """A das-lab checkpoint's data config, backbone and task module, rebuilt from its stored config.

    ``data_replacements`` override data keys (``None`` values keep the stored ones), e.g. a moved
    dataset root. The network's own ``checkpoint`` key is cleared: the weights come from this file.
    """
    checkpoint = read_checkpoint(ckpt_path)
    stored = checkpoint.get(CONFIG_KEY)
    if stored is None:
        raise CheckpointError(
            f"{ckpt_path} has no '{CONFIG_KEY}' entry: it was not written by `das-lab train`. "
            "Use init_from=<file> with `das-lab train` to start from foreign weights."
        )
    model_cfg = OmegaConf.create(stored["model"])
    legacy_base = LEGACY_MODEL_TARGETS.get(model_cfg.get("_target_"))
    if legacy_base is not None:
        model_cfg._target_, model_cfg.name = BUILDER_TARGET, legacy_base
    if "checkpoint" in model_cfg:
        model_cfg.checkpoint = None
    net, module = build_module(model_cfg, stored["task"], stored["optimizer"], stored["scheduler"])
    check_checkpoint_fits(module, checkpoint, ckpt_path)
    module.load_state_dict(checkpoint["state_dict"])
    data_cfg = OmegaConf.create(stored["data"])
    for key, value in (data_replacements or {}).items():
        if value is None:
            continue
        if key not in data_cfg:
            raise ValueError(
                f"data.{key}={value}: the checkpoint's dataset ({data_cfg.get('_target_')}) has no '{key}' setting; "
                f"drop data.{key} (replaceable here: {', '.join(k for k in data_replacements if k in data_cfg)})"
            )
        data_cfg[key] = value
    return Restored(
        data_cfg, net, module, stored.get("flops_image_size", data_cfg.get("image_size")), checkpoint.get(CLASSES_KEY)
    )
