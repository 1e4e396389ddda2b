"""The task contract: the metrics a task declares and the data it reads, so runs, sweeps and reports need not guess.

A task module lists every metric it logs once, in its ``metric_specs`` class attribute. Best-epoch
selection (``das_lab.run.MetricHistory``), the objective a sweep job returns, metrics.json's
``metrics`` entry and ``das-lab report`` all read that list. What a task reads from its datamodule
is a Protocol below, checked by :func:`require_data` with one clear error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Optional, Protocol, Sequence, TypeVar

from das_lab.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Direction = Literal["max", "min"]
Unit = Literal["fraction", "value"]
DIRECTIONS: tuple[str, ...] = ("max", "min")
UNITS: tuple[str, ...] = ("fraction", "value")


@dataclass(frozen=True)
class MetricSpec:
    """One logged metric: its name under ``<stage>/``, which way is better, how to show it.

    ``unit`` ``fraction`` is a value in [0, 1] that reports show in percent; ``value`` is shown as
    it is. ``stages`` are the prefixes it is logged under; ``headline`` metrics are the columns
    of ``das-lab report``.
    """

    name: str
    direction: Direction
    unit: Unit
    title: str
    stages: tuple[str, ...] = ("val", "test")
    headline: bool = False

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS or self.unit not in UNITS:
            raise ValueError(
                f"MetricSpec {self.name!r}: direction={self.direction!r} (expected one of {DIRECTIONS}), "
                f"unit={self.unit!r} (expected one of {UNITS})"
            )

    def key(self, stage: str) -> str:
        """The logged name, e.g. ``val/miou``."""
        return f"{stage}/{self.name}"

    def keys(self) -> list[str]:
        """Every logged name of this metric, one per stage."""
        return [self.key(stage) for stage in self.stages]

    def better(self, first: float, second: float) -> float:
        """The better of two values of this metric."""
        return max(first, second) if self.direction == "max" else min(first, second)

    def format(self, value: Optional[float]) -> str:
        """A value as reports show it: fractions in percent with two decimals, other values with 4 digits."""
        if value is None or not math.isfinite(value):
            return "-"
        return f"{100 * value:.2f}" if self.unit == "fraction" else f"{value:.4g}"

    def label(self, text: str) -> str:
        """``text`` (a column or axis name) with the unit the values are shown in."""
        return f"{text} (%)" if self.unit == "fraction" else text

    def record(self) -> dict[str, Any]:
        """The metrics.json entry of one logged name: how it was judged and is shown."""
        return {"direction": self.direction, "unit": self.unit, "title": self.title, "headline": self.headline}


Declarations = dict[str, MetricSpec]


def task_metrics(task: Any) -> tuple[MetricSpec, ...]:
    """A task module's (or class's) declared metrics; a task without them is refused with how to declare them."""
    specs = getattr(task, "metric_specs", None)
    name = task.__name__ if isinstance(task, type) else type(task).__name__
    if not specs or not all(isinstance(spec, MetricSpec) for spec in specs):
        raise TypeError(
            f"{name} declares no metrics: give it a class attribute metric_specs = (MetricSpec(name, direction, "
            f"unit, title), ...) listing every metric it logs (das_lab/tasks/base.py)"
        )
    return tuple(specs)


def metric_declarations(
    specs: Sequence[MetricSpec], monitor: Optional[str] = None, monitor_mode: Optional[str] = None
) -> Declarations:
    """Logged name -> declaration; the monitored metric, when declared, is judged by ``monitor_mode``.

    ``monitor_mode`` is what the checkpoint callback and the sweeper's study use, so best values,
    ``ckpt_best`` and the sweep objective all agree with it.
    """
    declared = {key: spec for spec in specs for key in spec.keys()}
    if monitor in declared and monitor_mode in DIRECTIONS:
        declared[monitor] = replace(declared[monitor], direction=monitor_mode)
    return declared


def monitored_declarations(specs: Sequence[MetricSpec], monitor: str, monitor_mode: str, owner: str) -> Declarations:
    """:func:`metric_declarations` for a run that picks checkpoints by ``monitor``: both keys must fit the task."""
    if monitor_mode not in DIRECTIONS:
        raise ConfigError(f"monitor_mode={monitor_mode}: expected one of {', '.join(DIRECTIONS)}")
    declared = metric_declarations(specs)
    if monitor not in declared:
        choices = ", ".join(key for key in declared if not key.startswith("test/"))
        raise ConfigError(f"monitor={monitor}: {owner} logs no such metric; set monitor to one of {choices}")
    if declared[monitor].direction != monitor_mode:
        log.warning(
            "monitor=%s is declared '%s' by %s, but monitor_mode=%s: the best checkpoint, metrics.json's best "
            "%s and the sweep objective follow monitor_mode",
            monitor,
            declared[monitor].direction,
            owner,
            monitor_mode,
            monitor,
        )
    return metric_declarations(specs, monitor, monitor_mode)


def declarations_from_record(record: Mapping[str, Mapping[str, Any]]) -> Declarations:
    """The declarations a run folder's metrics.json ``metrics`` entry holds (the inverse of ``MetricSpec.record``)."""
    declared = {}
    for key, entry in record.items():
        stage, _, name = key.partition("/")
        declared[key] = MetricSpec(
            name,
            entry["direction"],
            entry["unit"],
            entry.get("title", name),
            (stage,),
            bool(entry.get("headline", False)),
        )
    return declared


def records_of(declared: Mapping[str, MetricSpec], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """metrics.json's ``metrics`` entry: the declaration of each of ``keys`` that is declared."""
    return {key: declared[key].record() for key in keys if key in declared}


# ----------------------------------------------------------------------------- what tasks read from their data


class BatchedData(Protocol):
    """A datamodule whose batch size scales the learning rate (``task.lr_reference_batch``)."""

    batch_size: int


class DetectionData(Protocol):
    """What the detection task reads from its datamodule (``data=coco`` implements it)."""

    category_ids: list[int]
    with_masks: bool

    def ground_truth(self, stage: str) -> dict[str, Any]:
        """The COCO annotation dict of the ``val`` or ``test`` split."""
        ...


class NamedClasses(Protocol):
    """A datamodule that names its classes (per-class scores, figure titles)."""

    class_names: list[str]


class ImageInputs(Protocol):
    """What turns any image file into a model input: ``das-lab visualize``, ``predict`` and ``export``."""

    class_names: list[str]
    eval_transform: Callable[[torch.Tensor], torch.Tensor]

    def eval_data_config(self) -> dict[str, Any]:
        """The eval preprocessing in timm's terms (input size, mean, std, crop, interpolation)."""
        ...


DataInterface = TypeVar("DataInterface")


def _members(interface: type) -> list[str]:
    names = list(getattr(interface, "__annotations__", {}))
    names += [name for name, value in vars(interface).items() if callable(value) and not name.startswith("_")]
    return names


def require_data(datamodule: Any, interface: type[DataInterface], user: str) -> DataInterface:
    """``datamodule`` typed as ``interface``, or one error naming what it lacks and who needs it."""
    if datamodule is None:
        raise ConfigError(f"{user} reads its data through a datamodule ({interface.__name__}), but got none")
    missing = [name for name in _members(interface) if not hasattr(datamodule, name)]
    if missing:
        raise ConfigError(
            f"{type(datamodule).__name__} lacks {', '.join(missing)}, which {user} reads ({interface.__name__} in "
            f"das_lab/tasks/base.py): use a datamodule that provides them or add them to this one"
        )
    return datamodule
