"""Stanford Dogs datamodule on a tiny copy of the official release."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from das_lab.callbacks.skipped_images import SkippedImagesReport
from das_lab.data.decode import CorruptImageError
from das_lab.data.stanford_dogs import StanfordDogsDataModule
from fake_datasets import DOG_BREEDS, class_colour, make_stanford_dogs, make_stanford_dogs_archives, snapshot, truncate

BASIC = {"scale": [0.5, 1.0], "hflip": 0.5}


def dogs(root: Path, cache: Path, **overrides) -> StanfordDogsDataModule:
    args = dict(
        root=str(root),
        cache_dir=str(cache),
        image_size=32,
        num_classes=3,
        val_per_class=0,
        split_seed=0,
        crop_to_bbox=False,
        train_augment=BASIC,
        crop_pct=0.875,
        eval_interpolation="bilinear",
        skip_corrupt=False,
        batch_size=4,
        num_workers=0,
    )
    args.update(overrides)
    return StanfordDogsDataModule(**args)


def test_official_lists_give_splits_labels_and_breed_names(tmp_path: Path) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    dm = dogs(fake.root, tmp_path / "cache")
    dm.setup()
    assert dm.class_names == ["Chihuahua", "Japanese spaniel", "Maltese dog"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 6, 6)
    assert dm.val_set is dm.test_set
    for dataset in (dm.train_set, dm.test_set):
        for index, (path, label) in enumerate(dataset.samples):
            assert Path(path).parent.name == DOG_BREEDS[label]
            image = dataset.load_image(index)
            assert image.shape == (3, 40, 48) and image.dtype == torch.uint8
            if "_102" in path:  # plain RGB JPEGs: the red channel encodes the class
                assert abs(image[0].float().mean().item() - class_colour(label)[0]) < 3
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.long


def test_cmyk_grayscale_and_png_named_jpg_decode_to_rgb(tmp_path: Path) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    dm = dogs(fake.root, tmp_path / "cache")
    dm.setup()
    by_name = {Path(p).name: i for i, (p, _) in enumerate(dm.train_set.samples)}
    cmyk = dm.train_set.load_image(by_name["n02085620_100.jpg"])
    png = dm.train_set.load_image(by_name["n02085936_100.jpg"])
    gray = dm.train_set.load_image(by_name["n02085782_101.jpg"])
    assert cmyk.shape == png.shape == gray.shape == (3, 40, 48)
    assert abs(cmyk[0].float().mean().item() - class_colour(0)[0]) < 8
    assert png[0, 0, 0].item() == class_colour(2)[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_val_split_held_out_per_breed_with_fixed_seed(tmp_path: Path) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    first, second, other = (dogs(fake.root, tmp_path / "c", val_per_class=1, split_seed=s) for s in (0, 0, 1))
    for dm in (first, second, other):
        dm.setup()
    assert (len(first.train_set), len(first.val_set), len(first.test_set)) == (9, 3, 6)
    assert sorted(first.val_set.targets) == [0, 1, 2]
    assert first.val_set.samples == second.val_set.samples
    assert not set(first.val_set.samples) & set(first.train_set.samples)
    assert {p for p, _ in first.val_set.samples} <= {str(fake.root / "Images" / f) for f in fake.train}
    assert first.val_set.samples != other.val_set.samples


def test_crop_to_bbox_uses_the_union_of_all_dogs(tmp_path: Path) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    dm = dogs(fake.root, tmp_path / "cache", crop_to_bbox=True)
    dm.setup()
    for relative in (fake.two_object_image, fake.train[1]):
        index = [p for p, _ in dm.train_set.samples].index(str(fake.root / "Images" / relative))
        x0, y0, x1, y1 = fake.boxes[relative]
        assert dm.train_set.load_image(index).shape == (3, y1 - y0, x1 - x0)
    assert fake.boxes[fake.two_object_image] == (2, 3, 30, 33)


def test_archives_are_extracted_once_outside_the_dataset_folder(tmp_path: Path, caplog) -> None:
    fake = make_stanford_dogs_archives(tmp_path / "dogs", tmp_path / "staging")
    before = snapshot(fake.root)
    caplog.set_level(logging.INFO)
    first = dogs(fake.root, tmp_path / "cache", crop_to_bbox=True)
    first.prepare_data()
    first.setup()
    assert "extracting" in caplog.text and "once" in caplog.text
    extracted = Path(first.train_set.samples[0][0]).parents[2]
    assert extracted.parent == tmp_path / "cache" / "stanford_dogs"
    marker_time = (extracted / ".das_lab_extracted").stat().st_mtime_ns
    caplog.clear()
    second = dogs(fake.root, tmp_path / "cache")
    second.setup()
    assert "extracting" not in caplog.text and "extracted earlier" in caplog.text
    assert (extracted / ".das_lab_extracted").stat().st_mtime_ns == marker_time
    assert (len(second.train_set), len(second.test_set)) == (12, 6)
    assert snapshot(fake.root) == before
    assert [p.name for p in (tmp_path / "cache" / "stanford_dogs").iterdir()] == [extracted.name]


def test_extracted_release_is_left_untouched(tmp_path: Path) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    before = snapshot(fake.root)
    dm = dogs(fake.root, tmp_path / "cache", crop_to_bbox=True, skip_corrupt=True)
    dm.setup()
    next(iter(dm.train_dataloader()))
    assert snapshot(fake.root) == before
    assert not (tmp_path / "cache").exists()


def test_missing_dataset_names_the_expected_tree_and_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        dogs(tmp_path / "nowhere", tmp_path / "cache").setup()
    message = str(missing.value)
    assert str(tmp_path / "nowhere") in message and "does not exist" in message
    assert "Images/n02085620-Chihuahua/n02085620_10074.jpg" in message and "train_list.mat" in message
    assert "images.tar" in message and "vision.stanford.edu/aditya86/ImageNetDogs" in message
    (tmp_path / "wrong" / "pictures").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"archive\(s\) \['images.tar', 'lists.tar'\].*found \['pictures'\]"):
        dogs(tmp_path / "wrong", tmp_path / "cache").setup()


def test_wrong_class_count_is_explained(tmp_path: Path) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    with pytest.raises(ValueError, match=r"data.num_classes=120 but .* holds 3 classes; set data.num_classes=3"):
        dogs(fake.root, tmp_path / "cache", num_classes=120).setup()


def test_corrupt_image_fails_with_its_path_by_default(tmp_path: Path) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    bad = fake.root / "Images" / fake.train[1]
    truncate(bad)
    dm = dogs(fake.root, tmp_path / "cache")
    dm.setup()
    index = [p for p, _ in dm.train_set.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match=str(bad)):
        dm.train_set[index]


def test_skip_corrupt_replaces_and_counts_across_workers(tmp_path: Path) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    bad = [fake.root / "Images" / fake.train[i] for i in (1, 6)]
    for path in bad:
        path.write_bytes(b"this is not an image")
    dm = dogs(fake.root, tmp_path / "cache", skip_corrupt=True, num_workers=2, batch_size=3)
    dm.setup()
    seen = sum(len(labels) for _, labels in dm._loader(dm.train_set, shuffle=False))
    assert seen == 12
    assert sorted(dm.train_set.take_skipped()) == sorted(str(p) for p in bad)
    assert dm.train_set.take_skipped() == []


class _TinyClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))

    def _step(self, batch):
        images, labels = batch
        return nn.functional.cross_entropy(self.net(images), labels)

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._step(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_loop_runs_and_reports_skipped_images(tmp_path: Path, caplog) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    bad = fake.root / "Images" / fake.train[0]
    truncate(bad)
    dm = dogs(fake.root, tmp_path / "cache", skip_corrupt=True, batch_size=12)
    trainer = L.Trainer(
        max_epochs=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[report := SkippedImagesReport()],
    )
    caplog.set_level(logging.WARNING)
    trainer.fit(_TinyClassifier(), datamodule=dm)
    assert report.last_counts == {"train": 1, "val": 0}
    assert "1 corrupt image(s) skipped" in caplog.text and str(bad) in caplog.text
