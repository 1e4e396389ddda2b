"""`das-lab train` and `das-lab eval` on a generated ADE20K: DAS and DAT++ backbones, written predictions."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import read_metrics, run_cli, run_dirs
from das_lab.data.decode import read_rgb
from das_lab.pipeline import restore_checkpoint
from das_lab.tasks.segmentation_overlays import palette
from das_lab.utils.flops import count_gmacs, count_params
from das_lab.visualize import main as visualize_main
from fake_ade20k import make_ade20k
from test_segmentation import numpy_scores


def _train_args(root: Path, cache: Path, model: list[str]) -> list[str]:
    return [
        "train",
        "data=ade20k",
        f"data.root={root}",
        f"data.cache_dir={cache}",
        "data.num_workers=0",
        "data.pin_memory=false",
        "data.persistent_workers=false",
        "data.prefetch_factor=null",
        "data.scale=[96,64]",
        "data.crop_size=64",
        "data.batch_size=2",
        "data.expected_sizes=null",
        "task=segmentation",
        "task.channels=16",
        "task.neck_channels=16",
        "task.aux_channels=8",
        "task.test_scale=[96,64]",
        *model,
        "model.num_classes=0",
        "scheduler=poly",
        "scheduler.warmup_epochs=1",
        "optimizer.lr=1e-3",
        "trainer.max_epochs=-1",
        "trainer.max_steps=3",
        "trainer.check_val_every_n_epoch=null",
        "trainer.val_check_interval=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
        "monitor=val/miou",
        "monitor_mode=max",
    ]


@pytest.mark.slow
def test_train_das_resnet_then_eval_writes_release_format_predictions(tmp_path: Path) -> None:
    fake = make_ade20k(tmp_path / "data")
    done = run_cli(_train_args(fake.root, tmp_path / "cache", ["model=das_resnet_tiny"]), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (train_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(train_dir)
    assert metrics["status"] == "completed"
    assert {"val/miou", "val/macc", "val/aacc", "test/miou"} <= set(metrics["final"]) and "val/miou" in metrics["best"]
    assert all(0.0 <= metrics["final"][k] <= 1.0 for k in ("val/miou", "val/macc", "val/aacc"))
    # params and GFLOPs of the whole segmentor, on one image at task.test_scale [96, 64] (width x height)
    segmentor = restore_checkpoint(metrics["ckpt_best"]).module.segmentor
    assert metrics["params"] == count_params(segmentor)
    assert metrics["gflops"] == pytest.approx(count_gmacs(segmentor, (1, 3, 64, 96)), abs=1e-4)

    done = run_cli(
        [
            "eval",
            f"ckpt_path={metrics['ckpt_best']}",
            "splits=[val]",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    eval_dir = next(d for d in run_dirs(tmp_path) if d != train_dir)
    evaluated = read_metrics(eval_dir)
    scores = evaluated["final"]
    assert (evaluated["params"], evaluated["gflops"]) == (metrics["params"], metrics["gflops"])
    written = sorted((eval_dir / "predictions_val").glob("*.png"))
    assert [p.stem for p in written] == sorted(fake.labels["validation"])
    predictions, labels = [], []
    for path in written:
        prediction = np.asarray(Image.open(path))
        release = fake.labels["validation"][path.stem]
        assert prediction.dtype == np.uint8 and prediction.shape == release.shape
        assert prediction.min() >= 1 and prediction.max() <= 150
        predictions.append(prediction.astype(np.int64) - 1)
        labels.append(np.where(release == 0, 255, release.astype(np.int64) - 1))
    miou, macc, aacc = numpy_scores(predictions, labels, 150)
    assert scores["val/miou"] == pytest.approx(miou, abs=1e-6)
    assert scores["val/macc"] == pytest.approx(macc, abs=1e-6)
    assert scores["val/aacc"] == pytest.approx(aacc, abs=1e-6)
    with open(eval_dir / "per_class_val.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 150 and rows[0]["class"] == "wall" and rows[1]["class"] == "building"
    ious = [float(r["iou"]) for r in rows if r["iou"]]
    assert np.mean(ious) == pytest.approx(miou, abs=1e-5)

    # das-lab visualize of a segmentation checkpoint: the image with its predicted classes in colour
    image = fake.folder / "images" / "validation" / "ADE_val_00000001.jpg"
    args = [
        f"ckpt_path={metrics['ckpt_best']}",
        f"images=[{image}]",
        f"out_dir={tmp_path / 'vis'}",
        f"hydra.run.dir={tmp_path / 'visualize'}",
    ]
    assert visualize_main(args) == 0
    drawn = np.asarray(Image.open(tmp_path / "vis" / "ADE_val_00000001_overlay.png")).astype(np.int64)
    original = read_rgb(image).permute(1, 2, 0).numpy().astype(np.int64)
    colours = np.array(palette(150))[predictions[0]]
    assert drawn.shape == original.shape
    assert np.abs(drawn - (original + colours) / 2).max() <= 1


@pytest.mark.slow
def test_train_dat_pp_semantic_fpn(tmp_path: Path) -> None:
    fake = make_ade20k(tmp_path / "data", train=2, val=1)
    model = ["model=dat_nano", "model.out_norms=true", "task.head=fpn", "task.aux_weight=0", "test=false"]
    done = run_cli(_train_args(fake.root, tmp_path / "cache", model), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(run_dirs(tmp_path)[0])
    assert metrics["status"] == "completed" and 0.0 <= metrics["final"]["val/miou"] <= 1.0
