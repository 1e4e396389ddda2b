"""A plain (non-editable) install ships the configs and runs from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_runs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("das_lab-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    assert (site / "das_lab" / "conf" / "train.yaml").is_file()
    assert (site / "das_lab" / "conf" / "experiment" / "dogs_das.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import das_lab.config as c; print(c.config_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()) == site / "das_lab" / "conf"
    job = subprocess.run([sys.executable, "-m", "das_lab.cli", "train", "+experiment=dogs_das", "--cfg", "job"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    assert "das_lab.data.stanford_dogs.StanfordDogsDataModule" in job.stdout
