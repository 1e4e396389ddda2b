"""``das-lab profile`` of a segmentation task: the whole segmentor on one test-scale image, as mmseg's papers count it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from das_lab.models.builder import create_model
from das_lab.profile import main as profile_main
from das_lab.tasks.segmentation import SegmentationModule
from das_lab.utils.flops import cost_subject, count_gmacs, count_params

TINY_HEADS = {"channels": 16, "neck_channels": 16, "aux_channels": 8}


def test_segmentation_declares_the_whole_segmentor_at_its_test_scale() -> None:
    net = create_model("das_resnet_tiny", num_classes=0)
    module = SegmentationModule(net, optimizer=None, num_classes=150, **TINY_HEADS)
    network, size = cost_subject(net, module, image_size=32)
    assert network is module.segmentor and size == (512, 2048)  # test_scale [long, short] -> (height, width)
    assert count_params(network) == count_params(net) + count_params(module.segmentor.head) + count_params(
        module.segmentor.aux_head
    )


def test_profile_of_a_segmentation_task_counts_the_segmentor(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "data=ade20k",
        "task=segmentation",
        "model=das_resnet_tiny",
        "model.num_classes=0",
        "task.channels=16",
        "task.neck_channels=16",
        "task.aux_channels=8",
        "task.test_scale=[64,32]",
        "profile.device=cpu",
        "profile.warmup=0",
        "profile.repeats=1",
    ]
    # a training pass of one image fails in the pyramid pooling's BatchNorm (1x1 maps): one clear line
    assert profile_main([*args, "profile.batch_size=1", f"hydra.run.dir={tmp_path / 'one'}"]) == 2
    assert "use profile.batch_size=2 or more" in capsys.readouterr().err
    assert profile_main([*args, "profile.batch_size=2", f"hydra.run.dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "64x32 (width x height)" in out and "| GFLOPs @64x32 |" in out
    with (tmp_path / "profile.csv").open() as file:
        (row,) = list(csv.DictReader(file))
    module = SegmentationModule(
        create_model("das_resnet_tiny", num_classes=0),
        optimizer=None,
        num_classes=150,
        test_scale=(64, 32),
        **TINY_HEADS,
    )
    assert float(row["params_m"]) == pytest.approx(count_params(module.segmentor) / 1e6)
    assert float(row["gflops"]) == pytest.approx(count_gmacs(module.segmentor, (1, 3, 32, 64)))
    assert float(row["gflops"]) > count_gmacs(module.segmentor.backbone, (1, 3, 32, 64))
    assert float(row["fwd_img_s"]) > 0 and float(row["train_img_s"]) > 0
