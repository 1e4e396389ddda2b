"""How das-lab's model families become timm models, and how a model config becomes any timm model.

One fact in one place: a variant's hyper-parameters live in its ``conf/model/<variant>.yaml``
(a base config plus a few-line delta, through Hydra's defaults list). ``timm.create_model`` on a
das-lab name reads the same file through :func:`variant_args`, so the registry and the CLI
cannot drift apart. Every variant is built by timm's ``build_model_with_cfg`` (``pretrained_cfg``,
``pretrained=True`` through the family's ``checkpoint_filter_fn``); ``checkpoint=`` loads a local
file through :func:`das_lab.models.weights.load_weights`, and ``features_only=True`` wraps the
network in timm's ``FeatureGetterNet``, which takes its maps from ``forward_intermediates`` (so
they include the DAS gates and DAT++'s stage norms).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Optional

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.models import build_model_with_cfg, get_pretrained_cfg
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import Tensor, nn

from das_lab.config import config_dir
from das_lab.models.weights import FilterFn, load_weights

# Keys of a model config that belong to the factory, not to the family's constructor.
FACTORY_KEYS = ("_target_", "name", "pretrained", "num_classes", "checkpoint", "checkpoint_strict")
_WEIGHT_SOURCES = ("url", "hf_hub_id", "file", "state_dict")


def compose_model_config(config: str, chain: tuple[str, ...] = ()) -> DictConfig:
    """``conf/model/<config>.yaml`` merged over the configs its defaults list extends (same group)."""
    path = config_dir() / "model" / f"{config}.yaml"
    if not path.is_file():
        raise ValueError(f"model config {path} does not exist; expected one file per registered das-lab variant")
    if config in chain:
        raise ValueError(f"model config {path} extends itself through {' -> '.join(chain)}; remove the cycle")
    node = OmegaConf.load(path)
    defaults = list(node.pop("defaults", []))
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create()
    for entry in defaults:
        if not isinstance(entry, str):
            raise ValueError(f"{path}: defaults entry {entry!r}; model configs extend a sibling by name (- resnet50)")
        merged = OmegaConf.merge(merged, node if entry == "_self_" else compose_model_config(entry, (*chain, config)))
    return merged


def variant_args(config: str) -> dict[str, Any]:
    """Constructor arguments of a variant, read from its model config (the single source of truth)."""
    node = OmegaConf.to_container(compose_model_config(config), resolve=False)
    return {key: value for key, value in node.items() if key not in FACTORY_KEYS}


def _check_weight_source(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    if not pretrained:
        return
    given = kwargs.get("pretrained_cfg")  # e.g. timm.create_model("local-dir:DIR") passes the folder's config
    given = given.to_dict() if hasattr(given, "to_dict") else given if isinstance(given, dict) else {}
    cfg = {**get_pretrained_cfg(variant).to_dict(), **given, **(kwargs.get("pretrained_cfg_overlay") or {})}
    if not any(cfg.get(key) for key in _WEIGHT_SOURCES):
        raise ValueError(
            f"{variant} declares no pretrained weights (pretrained_cfg has no url/hf_hub_id/file); use model.checkpoint="
            f"<file> or pretrained_cfg_overlay={{'file': <file>}}"
        )


def load_checkpoint(model: nn.Module, checkpoint: Optional[str], strict: bool) -> nn.Module:
    """Load ``model.checkpoint`` (das-lab run, official or torchvision/timm file) through the family's filter."""
    if checkpoint:
        load_weights(model, checkpoint, strict=strict)
    return model


def create_variant(
    cls: type[nn.Module],
    variant: str,
    config: str,
    pretrained: bool,
    kwargs: dict[str, Any],
    filter_fn: FilterFn,
    default_out_indices: Callable[[nn.Module], tuple[int, ...]],
) -> nn.Module:
    """A registered das-lab variant built the way timm builds its own models (see module doc)."""
    kwargs = dict(kwargs)
    checkpoint = kwargs.pop("checkpoint", None)
    strict = kwargs.pop("checkpoint_strict", True)
    features_only = kwargs.pop("features_only", False)
    feature_cls = kwargs.pop("feature_cls", "getter")
    out_indices = kwargs.pop("out_indices", None)
    feature_args = {key: kwargs.pop(key) for key in ("output_fmt", "norm") if key in kwargs and features_only}
    if features_only and feature_cls != "getter":
        raise ValueError(
            f"{variant}: feature_cls={feature_cls!r} would hook module outputs and miss the DAS gates/stage norms; "
            "use feature_cls='getter' (the default), which reads forward_intermediates"
        )
    _check_weight_source(variant, pretrained, kwargs)
    model = build_model_with_cfg(
        cls, variant, pretrained, pretrained_filter_fn=filter_fn, **{**variant_args(config), **kwargs}
    )
    load_checkpoint(model, checkpoint, strict)
    if not features_only:
        return model
    indices = default_out_indices(model) if out_indices is None else tuple(out_indices)
    features = FeatureGetterNet(model, out_indices=indices, **feature_args)
    features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return features


def _unknown_name(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"model.name={name!r} is not a timm model; {hint}list names with timm.list_models('*{name[:6]}*')"


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint: Optional[str] = None,
    checkpoint_strict: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Any timm model by name (das-lab's included), with ``model.checkpoint`` loaded: the target of every model config."""
    import das_lab.models  # noqa: F401  (registers das-lab's variants before the lookup)

    if not timm.is_model(name):
        raise ValueError(_unknown_name(name))
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    return load_checkpoint(model, checkpoint, checkpoint_strict)


def take_indices(model: nn.Module, indices: Optional[int | list[int] | tuple[int, ...]]) -> tuple[list[int], int]:
    """timm's ``feature_take_indices`` over ``model.feature_info``, failing in one line on indices outside the levels."""
    levels = len(model.feature_info)
    try:
        return feature_take_indices(levels, indices)
    except AssertionError as err:
        strides = [info["reduction"] for info in model.feature_info]
        raise ValueError(
            f"out_indices/indices={indices!r}: {type(model).__name__} has feature levels 0..{levels - 1} "
            f"(strides {strides}; negative indices count from the end): {err}"
        ) from None


class FeatureLevels:
    """timm's ``forward_intermediates`` and ``prune_intermediate_layers`` over a model's ``feature_info`` levels.

    A family defines ``_level(level, x)`` (the computation from the previous level's map to this
    level's, gates included) and ``_prune_levels_after(level)``; what the intermediates return per
    level (``_level_output``, e.g. DAT++'s stage norms) and the head/norm pruning have defaults.
    """

    def _level(self, level: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _prune_levels_after(self, level: int) -> None:
        raise NotImplementedError

    def _present_levels(self) -> int:
        return len(self.feature_info)

    def _level_output(self, level: int, x: Tensor, norm: bool) -> Tensor:
        return x

    def _prune_norm(self) -> None:
        """Nothing to prune: the family applies no norm after its last level."""

    def _forward_levels(self, x: Tensor) -> Tensor:
        """The last level's map, level by level (the path grad checkpointing takes)."""
        for level in range(self._present_levels()):
            x = self._level(level, x)
        return x

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[int | list[int]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's intermediates: the maps of the ``indices`` levels (all by default) and the last map."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: {type(self).__name__} features are NCHW only")
        take, max_index = take_indices(self, indices)
        intermediates = []
        for level in range(max_index + 1 if stop_early else self._present_levels()):
            x = self._level(level, x)
            if level in take:
                intermediates.append(self._level_output(level, x, norm))
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the layers after the last wanted level (and the final norm / head), as timm's models do."""
        take, max_index = take_indices(self, indices)
        self._prune_levels_after(max_index)
        if prune_norm:
            self._prune_norm()
        if prune_head:
            self.reset_classifier(0, "")
        return take
