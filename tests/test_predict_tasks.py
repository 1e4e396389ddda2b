"""``das-lab predict`` and ONNX export on detection and segmentation checkpoints; the class names they carry.

One tiny detector and one tiny segmentor are trained in-process (a few steps, 64 px) through
``das-lab train``'s own code, once for this file.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from faster_coco_eval import COCO
from PIL import Image
from torchvision.transforms.v2 import functional as F

from cli_helpers import error_line, read_metrics
from das_lab.callbacks.checkpoint_state import CLASSES_KEY
from das_lab.cli import train_main
from das_lab.data.ade20k import normalize
from das_lab.data.decode import read_rgb
from das_lab.pipeline import read_checkpoint, restore_checkpoint
from das_lab.predict import main as predict_main
from fake_ade20k import CLASS_NAMES, make_ade20k
from fake_coco import CATEGORIES, make_fake_coco
from test_segmentation_cli import _train_args as segmentation_train_args

QUIET = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _train(args: list[str], run_dir: Path) -> str:
    """Train in this process; the run's best checkpoint."""
    assert train_main([*args, f"hydra.run.dir={run_dir}"]) == 0
    return read_metrics(run_dir)["ckpt_best"]


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> tuple[str, Path]:
    """A Faster R-CNN on the tiny DAS-ResNet after one step on a fake COCO: (checkpoint, its val images)."""
    root = tmp_path_factory.mktemp("detector")
    coco = make_fake_coco(root / "coco", num_train=4, num_val=3)
    ckpt = _train(
        [
            "data=coco",
            f"data.root={coco}",
            "data.num_classes=3",
            "data.num_workers=0",
            "task=detection",
            "task.min_size=64",
            "task.max_size=96",
            "task.fpn_channels=16",
            "task.box_head_dim=32",
            "model=das_resnet_tiny",
            "model.num_classes=0",
            "monitor=val/map",
            "flops_image_size=null",
            "test=false",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
            *QUIET,
        ],
        root / "run",
    )
    return ckpt, coco / "val2017"


@pytest.fixture(scope="module")
def segmentor(tmp_path_factory) -> tuple[str, Path]:
    """A UperNet on the tiny DAS-ResNet after three steps on a fake ADE20K: (checkpoint, its val images)."""
    root = tmp_path_factory.mktemp("segmentor")
    fake = make_ade20k(root / "data")
    ckpt = _train(segmentation_train_args(fake.root, root / "cache", ["model=das_resnet_tiny"])[1:], root / "run")
    return ckpt, fake.folder / "images" / "validation"


def _inputs(folder: Path, images: list[Path]) -> Path:
    """``images`` copied into ``folder`` (the last one, resized to 52x36, in a subfolder) plus an unreadable file."""
    (folder / "more").mkdir(parents=True)
    for image in images[:-1]:
        shutil.copy(image, folder / image.name)
    Image.open(images[-1]).resize((52, 36)).save(folder / "more" / images[-1].name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


def test_detection_writes_coco_json_with_category_names_and_draws_boxes(detector, tmp_path, capsys):
    ckpt, val_images = detector
    stored = read_checkpoint(ckpt)[CLASSES_KEY]
    assert stored == {"names": ["car", "cat", "toothbrush"], "category_ids": [3, 17, 90]}
    inputs = _inputs(tmp_path / "photos", sorted(val_images.glob("*.jpg"))[:3])
    out, boxes = tmp_path / "dets.json", tmp_path / "boxes"
    args = [
        f"ckpt_path={ckpt}",
        f"inputs={inputs}",
        f"out={out}",
        f"boxes_dir={boxes}",
        "box_threshold=0.0",
        "batch_size=2",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert predict_main(args) == 0
    captured = capsys.readouterr()
    assert f"3 image(s) labelled: {out}" in captured.out
    assert f"1 unreadable file(s) skipped:\n  {inputs / 'broken.jpg'}" in captured.err

    written = json.loads(out.read_text())
    assert written["categories"] == CATEGORIES
    files = sorted(p for p in inputs.rglob("*.jpg") if p.name != "broken.jpg")
    assert [(image["file_name"], image["height"], image["width"]) for image in written["images"]] == [
        (str(path), *read_rgb(path).shape[-2:]) for path in files
    ]
    annotations = written["annotations"]
    assert annotations and [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    names = {c["id"]: c["name"] for c in CATEGORIES}
    assert all(a["category_name"] == names[a["category_id"]] for a in annotations)
    assert len(COCO(written).anns) == len(annotations)  # a COCO dataset file, loadable as such

    module = restore_checkpoint(ckpt).module.eval()
    with torch.no_grad():
        expected = module.detector([F.to_dtype(read_rgb(path), torch.float32, scale=True) for path in files])
    for image, prediction in zip(written["images"], expected):
        mine = [a for a in annotations if a["image_id"] == image["id"]]
        assert [a["score"] for a in mine] == pytest.approx(prediction["scores"].tolist(), abs=1e-5)
        x1, y1, x2, y2 = prediction["boxes"].unbind(-1)
        reference = torch.stack([x1, y1, x2 - x1, y2 - y1], -1).tolist()
        assert [a["bbox"] for a in mine] == [pytest.approx(box, abs=1e-3) for box in reference]

    drawn = sorted(str(p.relative_to(boxes)) for p in boxes.rglob("*.png"))
    assert drawn == [str(p.relative_to(inputs).with_suffix(".png")) for p in files]
    for path in files:
        original, painted = read_rgb(path), read_rgb(boxes / path.relative_to(inputs).with_suffix(".png"))
        assert painted.shape == original.shape
        has_boxes = any(
            a["file_name"] == str(path) for a in written["images"] if any(b["image_id"] == a["id"] for b in annotations)
        )
        assert bool((painted != original).any()) == has_boxes


def test_segmentation_writes_release_format_label_pngs_at_each_images_size(segmentor, tmp_path, capsys):
    ckpt, val_images = segmentor
    assert read_checkpoint(ckpt)[CLASSES_KEY] == {"names": CLASS_NAMES}
    inputs = _inputs(tmp_path / "photos", sorted(val_images.glob("*.jpg")))
    out = tmp_path / "labels"
    args = [f"ckpt_path={ckpt}", f"inputs={inputs}", f"out={out}", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    assert predict_main(args) == 0
    captured = capsys.readouterr()
    assert f"3 image(s) labelled: {out}" in captured.out and str(inputs / "broken.jpg") in captured.err

    module = restore_checkpoint(ckpt).module.eval()
    files = sorted(p for p in inputs.rglob("*.jpg") if p.name != "broken.jpg")
    assert sorted(out.rglob("*.png")) == [out / p.relative_to(inputs).with_suffix(".png") for p in files]
    for path in files:
        label = np.asarray(Image.open(out / path.relative_to(inputs).with_suffix(".png")))
        image = read_rgb(path)
        assert label.dtype == np.uint8 and label.shape == tuple(image.shape[-2:])
        assert 1 <= label.min() and label.max() <= 150
        with torch.no_grad():
            expected = module.predict_probabilities(normalize(image)).argmax(0) + 1
        np.testing.assert_array_equal(label, expected.numpy())
    with open(out / "classes.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[:3] == [["label", "class"], ["1", "wall"], ["2", "building"]] and len(rows) == 151


def test_a_checkpoint_without_class_names_is_labelled_by_index_with_a_note(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint[CLASSES_KEY] == {"names": [str(d) for d in range(10)]}
    del checkpoint[CLASSES_KEY]
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    Image.new("RGB", (20, 20), (200, 200, 200)).save(tmp_path / "grey.png")
    run = tmp_path / "run"
    args = [
        f"ckpt_path={older}",
        f"inputs={tmp_path / 'grey.png'}",
        f"out={tmp_path / 'out.csv'}",
        f"hydra.run.dir={run}",
    ]
    assert predict_main(args) == 0
    with open(tmp_path / "out.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["class_1"].startswith("class_") and int(row["class_1"].removeprefix("class_")) in range(10)
    note = "the checkpoint stores no class names (an older das-lab): classes are named class_0 ... class_9"
    assert note in (run / "predict.log").read_text()


def test_predict_inputs_and_options_are_checked_in_one_line(detector, segmentor, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    for name in ("a.jpg", "a.png"):
        Image.new("RGB", (20, 20)).save(tmp_path / "photos" / name)
    run = tmp_path / "run"
    line = error_line(predict_main, [f"ckpt_path={segmentor[0]}", f"inputs={tmp_path / 'photos'}"], run, capsys)
    assert line == (
        "das-lab: error: inputs: several files would be written as a.png (they differ only in their "
        "suffix); give inputs a glob that picks one of them, e.g. inputs='photos/*.jpg'"
    )
    args = [f"ckpt_path={segmentor[0]}", f"inputs={tmp_path / 'photos' / 'a.jpg'}", f"boxes_dir={tmp_path / 'b'}"]
    line = error_line(predict_main, args, run, capsys)
    assert line == (
        f"das-lab: error: boxes_dir={tmp_path / 'b'}: boxes are drawn for detection checkpoints; "
        f"{segmentor[0]} holds a SegmentationModule, drop boxes_dir"
    )


def test_segmentation_exports_to_onnx_and_detection_is_refused_in_one_line(detector, segmentor, tmp_path, capsys):
    import onnxruntime

    from das_lab.export import main as export_main

    ckpt, _ = segmentor
    out = tmp_path / "onnx"
    assert export_main([f"ckpt_path={ckpt}", "format=onnx", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    assert "onnxruntime vs PyTorch max |diff|" in capsys.readouterr().out
    module = restore_checkpoint(ckpt).module.eval()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    side = module.crop_size  # the sliding window's crop: the unit of whole-image inference
    images = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(3))  # another batch size
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = module.segmentor(images)
    assert logits.shape == (3, 150, side, side) and (torch.from_numpy(logits) - expected).abs().max() < 1e-4

    timm_folder = [f"ckpt_path={ckpt}", "format=timm", f"out={tmp_path / 'timm'}"]
    assert error_line(export_main, timm_folder, tmp_path / "run2", capsys) == (
        f"das-lab: error: {ckpt} holds a SegmentationModule; das-lab export takes classification models "
        "(format=timm or onnx) and segmentation models (format=onnx)"
    )
    detection = [f"ckpt_path={detector[0]}", "format=onnx", f"out={tmp_path / 'det'}"]
    assert error_line(export_main, detection, tmp_path / "run3", capsys).startswith(
        f"das-lab: error: {detector[0]} holds a DetectionModule;"
    )
