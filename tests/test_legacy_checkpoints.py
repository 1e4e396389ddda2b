"""Checkpoints written by das-lab 0.1 (model config naming the family class) still evaluate."""

from __future__ import annotations

import pytest
import torch

from cli_helpers import read_metrics, run_cli, run_dirs
from das_lab.callbacks.checkpoint_state import CONFIG_KEY


def test_checkpoint_with_the_family_class_as_model_target_evaluates(tiny_checkpoint, tmp_path):
    root, ckpt = tiny_checkpoint
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = checkpoint[CONFIG_KEY]["model"]
    # das-lab 0.1's layout: the class as target with every constructor argument, no variant name
    del model["name"], model["pretrained"]
    model["_target_"] = "das_lab.models.das_resnet.DASResNet"
    legacy = tmp_path / "legacy.ckpt"
    torch.save(checkpoint, legacy)

    args = [f"ckpt_path={legacy}", "splits=[val]", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false"]
    evaluated = run_cli(["eval", *args], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    trained = read_metrics(run_dirs(root)[0])["final"]
    assert read_metrics(run_dirs(tmp_path)[0])["final"]["val/acc1"] == pytest.approx(trained["val/acc1"], abs=1e-6)
