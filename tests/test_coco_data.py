"""COCO datamodule: the on-disk format, filtering, label mapping, flips, batches and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from das_lab.data.coco import CocoDataModule
from das_lab.data.decode import CorruptImageError
from fake_coco import CATEGORIES, make_fake_coco


def _datamodule(root: Path, **overrides) -> CocoDataModule:
    args = dict(root=str(root), batch_size=2, num_workers=0, num_classes=3, hflip_prob=0.0)
    return CocoDataModule(**{**args, **overrides})


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    return make_fake_coco(tmp_path / "coco")


def _annotations(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_training_skips_crowd_and_empty_images_and_maps_labels(coco_root: Path) -> None:
    dm = _datamodule(coco_root)
    dm.setup("fit")
    raw = _annotations(coco_root, "train2017")
    ids_with_boxes = {a["image_id"] for a in raw["annotations"] if not a["iscrowd"]}
    assert sorted(dm.train_set.ids) == sorted(ids_with_boxes) and len(dm.train_set) == len(raw["images"]) - 2
    assert dm.category_ids == [3, 17, 90] and dm.class_names == ["car", "cat", "toothbrush"]
    for index in range(len(dm.train_set)):
        image, target = dm.train_set[index]
        expected = [a for a in raw["annotations"] if a["image_id"] == target["image_id"]]
        assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0
        # contiguous labels 1..3 map back to the original ids in the file's order
        assert [dm.category_ids[label - 1] for label in target["labels"].tolist()] == [
            a["category_id"] for a in expected
        ]
        x, y, w, h = expected[0]["bbox"]
        assert target["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h])
    # evaluation keeps every image; the one without annotations gets empty targets, crowds stay
    assert len(dm.val_set) == len(_annotations(coco_root, "val2017")["images"])
    empty = dm.val_set[0][1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert dm.val_set[1][1]["labels"].tolist() == [2]


def test_masks_flips_and_collation(coco_root: Path) -> None:
    dm = _datamodule(coco_root, with_masks=True, hflip_prob=1.0)
    dm.setup("fit")
    plain = _datamodule(coco_root, with_masks=True)
    plain.setup("fit")
    image, target = dm.train_set[0]
    reference_image, reference = plain.train_set[0]
    width = image.shape[-1]
    assert torch.equal(image, reference_image.flip(-1))
    assert torch.allclose(target["boxes"][:, [2, 0]], width - reference["boxes"][:, [0, 2]])
    assert target["masks"].shape == (len(target["labels"]), *image.shape[-2:])
    assert torch.equal(target["masks"], reference["masks"].flip(-1))
    # a polygon's mask covers about its box area
    box = reference["boxes"][0]
    box_area = float((box[2] - box[0]) * (box[3] - box[1]))
    assert 0.4 * box_area < reference["masks"][0].sum() <= 1.1 * box_area + 50
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(images) == len(targets) == 2
    assert all(i.shape[0] == 3 and i.shape[-2:] == t["masks"].shape[-2:] for i, t in zip(images, targets))
    assert all(t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64 for t in targets)


def test_val_and_test_share_one_split_and_its_ground_truth(coco_root: Path) -> None:
    dm = _datamodule(coco_root)
    dm.setup("validate")
    dm.setup("test")
    assert dm.test_set is dm.val_set
    ground_truth = dm.ground_truth("test")
    assert ground_truth["info"] and [c["id"] for c in ground_truth["categories"]] == [c["id"] for c in CATEGORIES]
    with pytest.raises(RuntimeError, match="no 'train' split"):
        dm.ground_truth("train")


def test_missing_folders_and_files_are_named(tmp_path: Path, coco_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="COCO root not found: .*nowhere"):
        _datamodule(tmp_path / "nowhere").setup("fit")
    (coco_root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        _datamodule(coco_root).setup("validate")
    with pytest.raises(FileNotFoundError, match="image folder not found: .*val2018"):
        _datamodule(coco_root, val_split="val2018").setup("validate")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d["annotations"][0].pop("category_id"), r"annotations\[0\] has no 'category_id'"),
        (lambda d: d["images"][2].pop("file_name"), r"images\[2\] has no 'file_name'"),
        (lambda d: d.pop("categories"), "missing list 'categories'"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotations\[1\]\['bbox'\]=\[1, 2, 3\]"),
        (lambda d: d["annotations"][0].update(category_id=1), r"'category_id'\]=1 is not in 'categories'"),
        (lambda d: d["annotations"][0].update(image_id=-5), r"'image_id'\]=-5 is not in 'images'"),
    ],
)
def test_broken_annotations_fail_at_setup_naming_the_key(coco_root: Path, corrupt, message: str) -> None:
    path = coco_root / "annotations" / "instances_train2017.json"
    dataset = json.loads(path.read_text())
    corrupt(dataset)
    path.write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match=message):
        _datamodule(coco_root).setup("fit")


def test_invalid_json_and_wrong_class_count(coco_root: Path) -> None:
    with pytest.raises(ValueError, match="data.num_classes=80 but .* defines 3 categories"):
        _datamodule(coco_root, num_classes=80).setup("fit")
    (coco_root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="instances_train2017.json: not valid JSON"):
        _datamodule(coco_root).setup("fit")


def test_non_utf8_annotations_name_the_file(coco_root: Path) -> None:
    path = coco_root / "annotations" / "instances_train2017.json"
    path.write_bytes(path.read_text().replace('"car"', '"\u00e9"').encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"instances_train2017.json: not UTF-8 text \(byte \d+: invalid continuation byte\)"
    ):
        _datamodule(coco_root).setup("fit")


def test_corrupt_image_reported_with_its_path(coco_root: Path) -> None:
    dm = _datamodule(coco_root)
    dm.setup("fit")
    file_name = dm.train_set.coco.loadImgs(dm.train_set.ids[0])[0]["file_name"]
    (coco_root / "train2017" / file_name).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(CorruptImageError, match=file_name):
        dm.train_set[0]
