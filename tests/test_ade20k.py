"""ADE20K as released: layouts (folder, zip), the official training pipeline, bad input, data verify."""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from das_lab.data.ade20k import (
    IGNORE_INDEX,
    ADE20KDataModule,
    TrainTransform,
    crop_box,
    rescale_size,
    to_train_ids,
)
from das_lab.data.decode import CorruptImageError
from das_lab.data.verify import main as verify_main
from fake_ade20k import make_ade20k, zip_release


def _datamodule(root: Path, cache: Path, **overrides) -> ADE20KDataModule:
    settings = dict(
        root=str(root),
        cache_dir=str(cache),
        num_classes=150,
        scale=[64, 48],
        ratio_range=[0.5, 2.0],
        crop_size=32,
        cat_max_ratio=0.75,
        hflip=0.5,
        expected_sizes=None,
        batch_size=2,
        num_workers=0,
    )
    return ADE20KDataModule(**{**settings, **overrides})


def test_folder_layout_samples_and_class_names(tmp_path: Path) -> None:
    fake = make_ade20k(tmp_path / "data")
    datamodule = _datamodule(fake.root, tmp_path / "cache")
    datamodule.setup()
    assert (len(datamodule.train_set), len(datamodule.val_set)) == (4, 3)
    assert datamodule.class_names[:2] == ["wall", "building"] and len(datamodule.class_names) == 150
    assert "extracted folder" in datamodule.layout
    image, label, name = datamodule.train_set[1]  # the grayscale JPEG
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and name == "ADE_train_00000002"
    assert label.shape == (32, 32) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= set(range(150)) | {IGNORE_INDEX}
    image, label, name = datamodule.val_set[0]
    release = fake.labels["validation"]["ADE_val_00000001"]
    assert image.shape == (3, 30, 40) and name == "ADE_val_00000001"
    assert torch.equal(label, to_train_ids(torch.from_numpy(release)))
    images, labels, names = datamodule.collate_fn()([datamodule.val_set[0], datamodule.val_set[1]])
    assert len(images) == len(labels) == 2 and names == ["ADE_val_00000001", "ADE_val_00000002"]


def test_release_labels_become_training_ids() -> None:
    ids = to_train_ids(torch.tensor([[0, 1, 150]], dtype=torch.uint8))
    assert ids.tolist() == [[IGNORE_INDEX, 0, 149]]


def test_zip_is_extracted_once_into_the_cache_never_into_root(tmp_path: Path) -> None:
    fake = make_ade20k(tmp_path / "staging")
    zip_release(fake, tmp_path / "data")
    datamodule = _datamodule(tmp_path / "data", tmp_path / "cache")
    datamodule.prepare_data()
    datamodule.setup()
    assert len(datamodule.val_set) == 3 and "extracted into" in datamodule.layout
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ADEChallengeData2016.zip"]
    extracted = list((tmp_path / "cache" / "ade20k").iterdir())
    assert len(extracted) == 1 and (extracted[0] / "ADEChallengeData2016" / "objectInfo150.txt").is_file()
    again = _datamodule(tmp_path / "data", tmp_path / "cache")
    again.setup()
    assert again.layout == datamodule.layout


def test_zip_without_top_folder_is_named(tmp_path: Path) -> None:
    fake = make_ade20k(tmp_path / "staging")
    archive = zip_release(fake, tmp_path / "data", top="release")
    with pytest.raises(ValueError, match="no top folder ADEChallengeData2016/") as error:
        _datamodule(tmp_path / "data", tmp_path / "cache").setup()
    assert str(archive) in str(error.value) and "\n" not in str(error.value)


def test_missing_dataset_shows_the_expected_tree(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="objectInfo150.txt"):
        _datamodule(tmp_path / "absent", tmp_path / "cache").setup()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("value", "label value 151; expected 0 (unlabelled) to 150"),
        ("rgb", "3 channel(s) of torch.uint8; expected a single-channel uint8 PNG"),
        ("size", "label map is 20x30 but ADE_val_00000001.jpg is 40x30; expected the same width x height"),
    ],
)
def test_bad_label_maps_fail_in_one_line_naming_the_file(tmp_path: Path, damage: str, message: str) -> None:
    fake = make_ade20k(tmp_path / "data")
    path = fake.folder / "annotations" / "validation" / "ADE_val_00000001.png"
    label = fake.labels["validation"]["ADE_val_00000001"].copy()
    if damage == "value":
        label[0, 0] = 151
        Image.fromarray(label).save(path)
    elif damage == "rgb":
        Image.fromarray(np.stack([label] * 3, axis=-1)).save(path)
    else:
        Image.fromarray(label[:, :20]).save(path)
    datamodule = _datamodule(fake.root, tmp_path / "cache")
    datamodule.setup()
    with pytest.raises(CorruptImageError) as error:
        datamodule.val_set[0]
    assert str(error.value).startswith(str(path)) and message in str(error.value) and "\n" not in str(error.value)


def test_image_without_label_is_named(tmp_path: Path) -> None:
    fake = make_ade20k(tmp_path / "data")
    (fake.folder / "annotations" / "training" / "ADE_train_00000003.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"ADE_train_00000003.jpg: no label map; expected .*ADE_train_00000003.png"
    ):
        _datamodule(fake.root, tmp_path / "cache").setup()


def test_keep_ratio_rescale_matches_mmseg() -> None:
    # landscape 683x512 at scale (2048, 512): the short side limits; portrait 600x800: the short side too
    assert rescale_size(512, 683, (2048, 512), 1.0) == (512, 683)
    assert rescale_size(800, 600, (2048, 512), 1.0) == (683, 512)
    assert rescale_size(512, 683, (2048, 512), 0.5) == (256, 342)
    # a very wide image is limited by the long side
    assert rescale_size(100, 4000, (2048, 512), 1.0) == (51, 2048)


def test_crop_keeps_one_class_under_the_ratio_when_it_can() -> None:
    # columns 0-39 class 0, 40-59 class 1: only crops starting at columns 26-34 of 0-40 have both
    # classes with neither reaching 75% (9 in 41 for one draw; 10 draws find one 92% of the time)
    label = torch.zeros(20, 60, dtype=torch.int64)
    label[:, 40:] = 1

    def qualifies(left: int) -> bool:
        share = label[:, left : left + 20].float().mean()
        return 0.25 < share < 0.75

    random.seed(0)
    single = [qualifies(crop_box(label, 20, 1.0)[1]) for _ in range(300)]
    random.seed(0)
    ruled = [qualifies(crop_box(label, 20, 0.75)[1]) for _ in range(300)]
    assert sum(single) / 300 < 0.35 and sum(ruled) / 300 > 0.8


def test_train_pipeline_pads_with_zero_and_the_ignore_label() -> None:
    random.seed(0)
    transform = TrainTransform(scale=(40, 30), ratio_range=(0.5, 0.5), crop_size=32, cat_max_ratio=0.75, hflip=0.0)
    image = torch.full((3, 30, 40), 200, dtype=torch.uint8)
    label = torch.full((30, 40), 7, dtype=torch.int64)
    out_image, out_label = transform(image, label)
    # 40x30 at half scale is 20x15: the rest of the 32x32 crop is padding
    assert out_image.shape == (3, 32, 32) and out_label.shape == (32, 32)
    assert (out_label[:15, :20] == 7).all() and (out_label[15:] == IGNORE_INDEX).all()
    assert (out_label[:, 20:] == IGNORE_INDEX).all() and (out_image[:, 15:] == 0).all()
    assert out_image[:, :15, :20].abs().sum() > 0


def test_data_verify_reports_counts_and_problems(tmp_path: Path, capsys) -> None:
    fake = make_ade20k(tmp_path / "data")
    args = ["data=ade20k", f"data.root={fake.root}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
    assert verify_main(args + ["data.expected_sizes=null"]) == 0
    out = capsys.readouterr().out
    assert "train images" in out and "0 of 4 decoded" in out and "0 of 3 decoded" in out and "data verify: OK" in out
    assert verify_main(args) == 1
    assert "train split has 4 images; the official release has 20210" in capsys.readouterr().err
    bad = fake.folder / "annotations" / "training" / "ADE_train_00000002.png"
    Image.fromarray(np.full((30, 40), 200, dtype=np.uint8)).save(bad)
    assert verify_main(args + ["data.expected_sizes=null"]) == 1
    captured = capsys.readouterr()
    assert (
        "1 of 4 decoded" in captured.out and f"{bad}: label value 200; expected 0 (unlabelled) to 150" in captured.err
    )


def test_data_verify_on_the_zip(tmp_path: Path, capsys) -> None:
    zip_release(make_ade20k(tmp_path / "staging"), tmp_path / "data")
    args = [
        "data=ade20k",
        f"data.root={tmp_path / 'data'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "data.expected_sizes=null",
    ]
    assert verify_main(args) == 0
    assert "extracted into" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "data" / "ADEChallengeData2016.zip") as handle:
        assert all(name.startswith("ADEChallengeData2016/") for name in handle.namelist())
