"""Every benchmark script imports: a helper moved inside das_lab must not silently break the benchmarks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.fixture
def benchmark_path(monkeypatch):
    """The benchmarks import each other and the tests' data writers by plain module name."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def test_the_benchmarks_folder_holds_the_documented_scripts():
    names = {script.stem for script in SCRIPTS}
    assert {"dat_attention", "data_pipeline", "gpu_check", "dat_vs_official", "train_step"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_script_imports_and_has_a_main(script, benchmark_path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
    assert module.__doc__, f"{script.name} has no docstring saying what it measures"
