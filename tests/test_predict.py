"""``das-lab predict``: a folder of one's own images labelled by a checkpoint or an exported timm folder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from cli_helpers import error_line, run_cli
from das_lab.data.decode import read_rgb
from das_lab.data.digits import DigitsDataModule
from das_lab.export import main as export_main
from das_lab.pipeline import restore_checkpoint
from das_lab.predict import main as predict_main
from das_lab.visualize import eval_transform


@pytest.fixture(scope="module")
def trained(tiny_checkpoint) -> tuple[Path, str, Path]:
    """The shared tiny digits checkpoint (conftest.py) and a folder of test canvases as PNGs (plus two broken files)."""
    root, ckpt = tiny_checkpoint
    images = root / "images"
    (images / "more").mkdir(parents=True)
    data = DigitsDataModule(image_size=32, digit_size=16, num_distractors=2, train_copies=1, eval_copies=1)
    data.setup()
    for i in range(5):
        canvas = data.test_set.canvases[i, 0].numpy()
        Image.fromarray(canvas).save(images / ("more" if i == 4 else ".") / f"digit{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    (images / "notes.txt").write_text("not an image")
    return root, ckpt, images


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_checkpoint_labels_a_folder_and_lists_unreadable_files(trained):
    root, ckpt, images = trained
    result = run_cli(["predict", f"ckpt_path={ckpt}", f"inputs={images}", "out=labels.csv", "batch_size=2"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 image(s) labelled" in result.stdout
    assert "2 unreadable file(s) skipped" in result.stderr
    assert str(images / "broken.png") in result.stderr and str(images / "notes.txt") in result.stderr

    rows = _rows(root / "labels.csv")
    assert [Path(row["file"]).name for row in rows] == [f"digit{i}.png" for i in range(5)]
    assert list(rows[0]) == ["file", *(f"{c}_{k}" for k in range(1, 6) for c in ("class", "prob"))]
    restored = restore_checkpoint(ckpt)
    net, transform = restored.net, eval_transform(instantiate(restored.data))
    with torch.no_grad():
        probs = net.eval()(torch.stack([transform(read_rgb(row["file"])) for row in rows])).softmax(-1)
    for row, expected in zip(rows, probs):
        top = expected.topk(5)
        assert [row[f"class_{k}"] for k in range(1, 6)] == [str(c) for c in top.indices.tolist()]
        np.testing.assert_allclose([float(row[f"prob_{k}"]) for k in range(1, 6)], top.values.numpy(), atol=1e-6)


@pytest.mark.slow
def test_exported_folder_predicts_what_the_checkpoint_predicts(trained, tmp_path):
    root, ckpt, images = trained
    export_main([f"ckpt_path={ckpt}", f"out={tmp_path / 'hub'}", f"hydra.run.dir={tmp_path / 'run1'}"])
    for source, name in ((f"export={tmp_path / 'hub'}", "export.csv"), (f"ckpt_path={ckpt}", "ckpt.csv")):
        predict_main([source, f"inputs={images}/digit*.png", f"out={tmp_path / name}", f"hydra.run.dir={tmp_path}/r"])
    from_export, from_ckpt = _rows(tmp_path / "export.csv"), _rows(tmp_path / "ckpt.csv")
    assert len(from_export) == 4
    assert [row["class_1"] for row in from_export] == [row["class_1"] for row in from_ckpt]
    top_probs = [[float(row["prob_1"]) for row in rows] for rows in (from_export, from_ckpt)]
    np.testing.assert_allclose(*top_probs, atol=1e-2)


def test_bad_input_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    line = error_line(predict_main, ["ckpt_path=model.ckpt", f"inputs={tmp_path / 'empty'}"], run, capsys)
    assert line == (
        f"das-lab: error: inputs={tmp_path / 'empty'}: no files found; give a folder of images, an image file "
        "or a glob ('photos/*.jpg')"
    )
    line = error_line(predict_main, ["ckpt_path=model.ckpt", "export=hub", f"inputs={tmp_path}"], run, capsys)
    assert line == (
        "das-lab: error: give exactly one model: ckpt_path=PATH (a das-lab checkpoint) or export=DIR (a timm folder)"
    )
    line = error_line(predict_main, [f"export={tmp_path / 'empty'}", f"inputs={tmp_path}"], run, capsys)
    assert "has no config.json: give a folder written by das-lab export format=timm" in line
