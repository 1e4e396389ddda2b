"""Load a weights file into a network safely, and say exactly what did and did not fit.

Accepted files (all read with ``torch.load(weights_only=True)``, so no pickled code runs):
a raw ``state_dict``; a dict holding it under ``"state_dict"`` or ``"model"`` (torchvision /
timm training scripts); a Lightning ``.ckpt`` whose network keys carry the task module's
``net.`` prefix (entries without it, e.g. loss buffers, belong to the task and are skipped).
A ``module.`` prefix left by DistributedDataParallel is removed as well.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from das_lab.errors import CheckpointError, CheckpointNotFoundError, PickledCheckpointError

log = logging.getLogger(__name__)

_NESTED_KEYS = ("state_dict", "model")
_PREFIXES = ("net.", "module.")
_CLASSIFIER_NAMES = ("fc", "classifier", "head", "cls_head")

StateDict = dict[str, Tensor]
FilterFn = Callable[[StateDict, nn.Module], StateDict]


@dataclass
class LoadReport:
    """Keys of a load: loaded, new in the model, unknown to it, and of the wrong shape."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when every key outside the expected new modules matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def hint(self) -> str:
        """How to resolve the problems this report lists."""
        hints = []
        classifier = [key for key, _, _ in self.mismatched if set(key.split(".")) & set(_CLASSIFIER_NAMES)]
        if classifier:
            hints.append(
                "the classifier's shape differs: set model.num_classes to the checkpoint's class count to "
                "evaluate it, or load non-strictly (model.checkpoint_strict=false / strict=False) to fine-tune "
                "with a fresh classifier"
            )
        if self.missing or self.unexpected or len(classifier) < len(self.mismatched) or not self.loaded:
            hints.append(
                "check that the file belongs to this architecture (same model.* depth and widths), or load "
                "non-strictly (model.checkpoint_strict=false / strict=False) to keep what matches"
            )
        return "; ".join(hints)

    def __str__(self) -> str:
        if not self.loaded:
            file_key = self.unexpected[0] if self.unexpected else "none"
            model_key = (self.missing + self.expected_missing + [k for k, _, _ in self.mismatched] or ["none"])[0]
            return (
                f"weights {self.path}: no key fits this model (file has e.g. {file_key!r}, the model expects e.g. "
                f"{model_key!r}); expected a das-lab, official DAT++ or torchvision/timm ResNet checkpoint "
                f"of this architecture"
            )
        lines = [f"weights {self.path}: {len(self.loaded)} tensors loaded"]
        if self.expected_missing:
            lines.append(f"  new in the model (freshly initialised): {_short(self.expected_missing)}")
        if self.missing:
            lines.append(f"  missing from the file: {_short(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (not in the model): {_short(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
            lines.append(f"  shape mismatch: {_short(shapes)}")
        if not self.clean or not self.loaded:
            lines.append(f"  hint: {self.hint()}")
        return "\n".join(lines)


class WeightsMismatchError(RuntimeError):
    """A strict load found keys that do not fit; ``.report`` holds the details."""

    def __init__(self, report: LoadReport) -> None:
        super().__init__(str(report))
        self.report = report


def _short(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        if any(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return dict(state)


def read_torch_file(path: Union[str, Path], subject: str, hint: str) -> object:
    """``torch.load(weights_only=True)`` of ``path``, with one message per way it fails.

    ``subject`` names the file in the message ("checkpoint", "weights file"); ``hint`` says how to fix it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        reason = "it is a folder, not a file" if path.is_dir() else "the path does not exist"
        raise CheckpointNotFoundError(f"{subject} not found: {path} ({reason}; {hint})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise PickledCheckpointError(
            f"{path} holds pickled Python objects besides tensors, so it is not loaded (weights_only=True); {hint}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable {subject} (truncated or not written by torch.save: "
            f"{str(error).splitlines()[0]}); {hint}"
        ) from error


def read_state_dict(path: Union[str, Path]) -> dict[str, Tensor]:
    """The network's tensors from any accepted weights file, with wrapper prefixes removed."""
    obj = read_torch_file(
        path,
        "weights file",
        "check model.checkpoint / init_from; a file you trust can be re-saved as weights "
        "only: torch.save(model.state_dict(), path)",
    )
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """The network's tensors inside a loaded checkpoint object, wrapper entries and prefixes removed."""
    for key in _NESTED_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{source} holds no state_dict: expected a dict of tensors, or one under 'state_dict' or 'model' "
            f"(Lightning .ckpt, training-script checkpoints)"
        )
    return _strip_prefixes(obj)


def fill_fresh(state: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """``state`` completed with the model's own (fresh) tensors of its ``fresh_modules()``, for timm's strict load.

    timm's ``pretrained=True`` loads strictly after the family's ``checkpoint_filter_fn``; the
    modules a base-network checkpoint cannot hold (DAS gates, detection norms) keep their
    initialisation, and the load says which.
    """
    state = unwrap_state_dict(dict(state))
    prefixes = fresh_modules(model)
    fresh = {
        key: value
        for key, value in model.state_dict().items()
        if key not in state and any(key == p or key.startswith(p + ".") for p in prefixes)
    }
    if fresh:
        log.info("pretrained weights: %d tensors start fresh (%s)", len(fresh), _short(sorted(fresh)))
    return {**state, **fresh}


def compare_state_dicts(
    own: Mapping[str, Tensor], state: Mapping[str, Tensor], path: str, new_modules: Sequence[str] = ()
) -> LoadReport:
    """Which keys of ``state`` fit a model whose state_dict is ``own``, by name and shape."""
    report = LoadReport(path=path)
    for key, value in own.items():
        if key not in state:
            is_new = any(key == p or key.startswith(p + ".") for p in new_modules)
            (report.expected_missing if is_new else report.missing).append(key)
        elif value.shape != state[key].shape:
            report.mismatched.append((key, tuple(state[key].shape), tuple(value.shape)))
        else:
            report.loaded.append(key)
    report.unexpected = [key for key in state if key not in own]
    return report


def fresh_modules(model: nn.Module) -> list[str]:
    """Modules a checkpoint of the base network cannot hold (DAS gates, detection norms), per the model."""
    declared = getattr(model, "fresh_modules", None)
    return list(declared()) if callable(declared) else []


def load_weights(
    model: nn.Module,
    path: Union[str, Path],
    *,
    strict: bool = True,
    new_modules: Optional[Sequence[str]] = None,
    filter_fn: Optional[FilterFn] = None,
) -> LoadReport:
    """Load ``path`` into ``model`` and return what fitted; raise with a hint when it does not.

    ``filter_fn`` maps a foreign layout onto the model's keys first (the family's
    ``checkpoint_filter_fn``: official DAT++ keys, torchvision/timm ResNet keys); by default the
    model's own ``filter_checkpoint`` method is used when it has one. ``new_modules`` are
    name prefixes of modules the file cannot contain (e.g. DAS gates added to a plain ResNet;
    default: the model's ``fresh_modules()``): their keys start fresh without failing a strict
    load. A non-strict load skips missing, unexpected and shape-mismatched keys and reports them,
    but still fails when nothing at all matches (wrong file).
    """
    state = read_state_dict(path)
    if filter_fn is not None:
        state = filter_fn(state, model)
    elif callable(getattr(model, "filter_checkpoint", None)):
        state = model.filter_checkpoint(state)
    new_modules = fresh_modules(model) if new_modules is None else new_modules
    report = compare_state_dicts(model.state_dict(), state, str(path), new_modules)
    if not report.loaded or (strict and not report.clean):
        raise WeightsMismatchError(report)
    model.load_state_dict({key: state[key] for key in report.loaded}, strict=False)
    log.info("%s", report)
    return report
