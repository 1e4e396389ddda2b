"""Real-format datasets, recipes, EMA and init_from through the das-lab command."""

from __future__ import annotations

import math

import pytest
import torch

from cli_helpers import read_metrics, run_cli, run_dirs
from fake_datasets import DOG_BREEDS, IMAGENET_WNIDS, make_imagenet_archives, make_stanford_dogs

pytestmark = pytest.mark.slow

SHORT = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "model=resnet_tiny",
    "data.image_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.pin_memory=false",
    "data.persistent_workers=false",
    "data.prefetch_factor=null",
]


@pytest.mark.parametrize("normalize_on", ["auto", "device"])
def test_stanford_dogs_with_paper_recipe(tmp_path, normalize_on):
    """``device`` (explicit, also on a CPU) converts, normalises and erases whole batches after transfer."""
    make_stanford_dogs(tmp_path / "dogs")
    result = run_cli(
        [
            "train",
            "data=stanford_dogs",
            f"data.root={tmp_path / 'dogs'}",
            f"data.num_classes={len(DOG_BREEDS)}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.normalize_on={normalize_on}",
            "recipe=dat_paper",
            *SHORT,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dirs(tmp_path)[0]
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed" and 0 <= metrics["final"]["test/acc1"] <= 1
    assert math.isfinite(metrics["final"]["train/loss"])
    where = "per batch after transfer" if normalize_on == "device" else "per image in the loader workers"
    assert f"images are normalised {where}" in (run_dir / "train.log").read_text()


def test_imagenet_archives_and_ema(tmp_path):
    make_imagenet_archives(tmp_path / "imagenet", tmp_path / "staging")
    result = run_cli(
        [
            "train",
            "data=imagenet",
            f"data.root={tmp_path / 'imagenet'}",
            f"data.num_classes={len(IMAGENET_WNIDS)}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.verify_md5=false",
            "callbacks=ema",
            *SHORT,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dirs(tmp_path)[0]
    assert read_metrics(run_dir)["status"] == "completed"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any("EMAWeightAveraging" in key for key in checkpoint["callbacks"])
    assert not any((tmp_path / "imagenet").glob("*/")), "nothing may be extracted into the dataset folder"


def test_init_from_loads_matching_weights_and_reports_the_rest(tmp_path):
    digits = ["data.image_size=32", "data.digit_size=16", "data.train_copies=1", "data.eval_copies=1", "test=false"]
    first = run_cli(["train", *SHORT, *digits, "model=das_resnet_tiny"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    source = run_dirs(tmp_path)[0] / "checkpoints" / "last.ckpt"
    second = run_cli(["train", *SHORT, *digits, f"init_from={source}"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = (run_dirs(tmp_path)[1] / "train.log").read_text()
    plain = sum(1 for key in torch.load(source, weights_only=True)["state_dict"] if "stage_gates" not in key)
    assert "tensors loaded" in log and "unexpected (not in the model): stage_gates." in log
    loaded = int(log.split(" tensors loaded")[0].rsplit(" ", 1)[-1])
    assert loaded == plain  # every tensor of the plain network came from the DAS checkpoint
