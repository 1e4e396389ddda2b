"""das-lab: train, evaluate, sweep and compare deformable-attention models.

Importing ``das_lab`` registers its models in timm's registry (``timm.create_model("das_resnet50")``)
without importing torch itself, so ``das-lab --help`` stays instant: if timm is already imported the
models register now, otherwise they register the moment timm finishes importing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Optional, Sequence

__version__ = "0.1.0"


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    """Import hook: once ``timm`` has executed, import ``das_lab.models`` (which registers the models)."""

    def find_spec(self, name: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            importlib.import_module("das_lab.models")

        spec.loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    importlib.import_module("das_lab.models")
elif not any(isinstance(finder, _RegisterWhenTimmLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
