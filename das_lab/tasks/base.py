"""What a task declares about its metrics, so runs, sweeps and reports need not guess from names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MetricSpec:
    """One logged metric: its name under ``<stage>/``, which way is better, how to show it."""

    name: str
    direction: Literal["max", "min"]
    unit: Literal["fraction", "value"]
    title: str

    def key(self, stage: str) -> str:
        """The logged name, e.g. ``val/miou``."""
        return f"{stage}/{self.name}"
