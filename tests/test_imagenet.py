"""ImageNet datamodule on tiny copies of both layouts (folders and official archives)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from das_lab.data.imagenet import ImageNetDataModule, readable_names
from fake_datasets import (
    IMAGENET_WNIDS,
    class_colour,
    devkit_ids,
    make_imagenet_archives,
    make_imagenet_folders,
    snapshot,
)


def imagenet(root: Path, cache: Path, **overrides) -> ImageNetDataModule:
    args = dict(
        root=str(root),
        cache_dir=str(cache),
        image_size=32,
        num_classes=4,
        max_per_class=None,
        verify_md5=False,
        train_augment={"scale": [0.5, 1.0], "hflip": 0.5},
        crop_pct=0.875,
        eval_interpolation="bilinear",
        skip_corrupt=False,
        batch_size=4,
        num_workers=0,
    )
    args.update(overrides)
    return ImageNetDataModule(**args)


def test_folder_layout_labels_names_and_quirky_files(tmp_path: Path, caplog) -> None:
    root = make_imagenet_folders(tmp_path / "imagenet")
    caplog.set_level(logging.INFO)
    dm = imagenet(root, tmp_path / "cache")
    dm.setup()
    assert "folder layout" in caplog.text
    assert dm.class_names == ["tench", "goldfish", "great white shark", "tiger shark"]
    assert (len(dm.train_set), len(dm.val_set)) == (12, 8) and dm.test_set is dm.val_set
    for index, (path, label) in enumerate(dm.train_set.samples):
        assert Path(path).parent.name == IMAGENET_WNIDS[label]
        image = dm.train_set.load_image(index)
        assert image.shape == (3, 40, 48)
        assert abs(image[0].float().mean().item() - class_colour(label)[0]) < 8
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]


def test_archives_map_devkit_ids_through_wnids_to_sorted_indices(tmp_path: Path, caplog) -> None:
    expected_val = make_imagenet_archives(tmp_path / "imagenet", tmp_path / "staging")
    assert list(devkit_ids().values()) != sorted(devkit_ids().values())
    before = snapshot(tmp_path / "imagenet")
    caplog.set_level(logging.INFO)
    dm = imagenet(tmp_path / "imagenet", tmp_path / "cache")
    dm.prepare_data()
    dm.setup()
    assert "official archives" in caplog.text and "extracting" in caplog.text
    assert [label for _, label in sorted(dm.val_set.samples, key=lambda s: Path(s[0]).name)] == expected_val
    assert all(Path(p).parent.name == IMAGENET_WNIDS[label] for p, label in dm.val_set.samples)
    for index, (_, label) in enumerate(dm.val_set.samples):
        assert abs(dm.val_set.load_image(index)[0].float().mean().item() - class_colour(label)[0]) < 3
    assert dm.class_names == ["tench", "goldfish", "great white shark", "tiger shark"]
    assert len(dm.train_set) == 12
    caplog.clear()
    imagenet(tmp_path / "imagenet", tmp_path / "cache").setup()
    assert "extracting" not in caplog.text and "extracted earlier" in caplog.text
    assert snapshot(tmp_path / "imagenet") == before


def test_md5_check_rejects_archives_that_are_not_the_official_ones(tmp_path: Path) -> None:
    make_imagenet_archives(tmp_path / "imagenet", tmp_path / "staging")
    with pytest.raises(ValueError, match=r"ILSVRC2012_img_train.tar: MD5 differs .* data.verify_md5=false"):
        imagenet(tmp_path / "imagenet", tmp_path / "cache", verify_md5=True).setup()
    assert not list((tmp_path / "cache" / "imagenet").iterdir())


def test_class_subset_is_evenly_spaced_and_max_per_class_caps_train(tmp_path: Path) -> None:
    root = make_imagenet_folders(tmp_path / "imagenet")
    dm = imagenet(root, tmp_path / "cache", num_classes=2, max_per_class=1)
    dm.setup()
    assert dm.class_names == ["tench", "great white shark"]
    assert [(Path(p).parent.name, label) for p, label in dm.train_set.samples] == [
        (IMAGENET_WNIDS[0], 0),
        (IMAGENET_WNIDS[2], 1),
    ]
    assert sorted(dm.val_set.targets) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"data.num_classes=5 but .* has 4 class folders"):
        imagenet(root, tmp_path / "cache", num_classes=5).setup()


def test_missing_layout_shows_both_expected_trees(tmp_path: Path) -> None:
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as missing:
        imagenet(tmp_path / "imagenet", tmp_path / "cache").setup()
    message = str(missing.value)
    assert "ILSVRC2012_img_train.tar" in message and "<root>/val/n01440764/" in message
    assert "found ['train']" in message and "image-net.org" in message


def test_readable_names_stay_unique() -> None:
    words = {"n02012849": "crane", "n03126707": "crane", "n01440764": "tench, Tinca tinca"}
    assert readable_names(list(words), words) == ["crane (n02012849)", "crane (n03126707)", "tench"]
    assert readable_names(["n99999999"], {}) == ["n99999999"]
