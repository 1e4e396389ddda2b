"""A plain (non-editable) install ships the configs and runs from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
    )
    (built,) = wheels.glob("das_lab-*.whl")
    return built


def test_plain_install_has_no_optuna_and_no_old_sqlalchemy(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    parsed = [Requirement(r) for r in requires]
    core = {r.name.lower() for r in parsed if r.marker is None}
    assert core.isdisjoint({"optuna", "sqlalchemy", "hydra-optuna-sweeper"}), core
    (search,) = [r for r in parsed if r.marker is not None and r.marker.evaluate({"extra": "search"})]
    assert search.name == "optuna" and str(search.specifier) == ">=4.9"  # no upper pin
    # Hydra finds the sweeper only inside the hydra_plugins namespace package (which has no __init__.py)
    assert "hydra_plugins/das_lab_search/optuna_sweeper.py" in names and "hydra_plugins/__init__.py" not in names
    assert "das_lab/conf/hydra/sweeper/das_lab_optuna.yaml" in names


def test_wheel_ships_configs_and_runs_outside_the_checkout(tmp_path, wheel):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (site / "das_lab" / "conf" / "train.yaml").is_file()
    assert (site / "das_lab" / "conf" / "experiment" / "dogs_das.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import das_lab.config as c; print(c.config_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()) == site / "das_lab" / "conf"
    job = subprocess.run(
        [sys.executable, "-m", "das_lab.cli", "train", "+experiment=dogs_das", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 0, job.stderr
    assert "das_lab.data.stanford_dogs.StanfordDogsDataModule" in job.stdout
