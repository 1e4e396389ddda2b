"""The embedded cluttered-digits data: real scans, deterministic canvases, disjoint splits."""

from __future__ import annotations

import pytest
import torch

from das_lab.data.digits import DigitsDataModule, render_canvases


def _small(**kwargs) -> DigitsDataModule:
    settings = dict(image_size=32, digit_size=16, train_copies=1, eval_copies=1, batch_size=8)
    return DigitsDataModule(**{**settings, **kwargs})


def test_splits_are_disjoint_stratified_and_cover_every_scan():
    dm = _small()
    labels = __import__("sklearn.datasets", fromlist=["load_digits"]).load_digits().target
    splits = dm._split_indices(labels)
    train, val, test = (set(splits[name].tolist()) for name in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 1797
    for name in ("val", "test"):
        counts = torch.bincount(torch.as_tensor(labels[splits[name]]), minlength=10)
        assert counts.min() >= 26  # 15% of the smallest class (174 scans)


def test_sizes_shapes_and_normalisation():
    dm = _small(train_copies=2, eval_copies=1)
    dm.setup()
    assert len(dm.train_set) == 2 * (1797 - len(dm.val_set) - len(dm.test_set))
    image, label = dm.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0 <= label < 10
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (8, 3, 32, 32)
    assert dm.class_names == [str(d) for d in range(10)]


def test_same_seed_same_canvases_other_seed_differs():
    first, second, other = _small(), _small(), _small(seed=1)
    for dm in (first, second, other):
        dm.setup()
    assert torch.equal(first.test_set.canvases, second.test_set.canvases)
    assert torch.equal(first.train_set.labels, second.train_set.labels)
    assert not torch.equal(first.test_set.canvases, other.test_set.canvases)


def test_digit_is_pasted_whole_and_distractors_are_added():
    scans = torch.zeros(2, 8, 8)
    scans[:, 2:6, 2:6] = 1.0
    generator = torch.Generator().manual_seed(0)
    canvases, labels = render_canvases(scans, torch.tensor([3, 7]), 2, 32, 8, 0, generator)
    assert canvases.shape == (4, 1, 32, 32) and labels.tolist() == [3, 7, 3, 7]
    assert (canvases.flatten(1) == 255).sum(1).tolist() == [16, 16, 16, 16]
    cluttered, _ = render_canvases(scans, torch.tensor([3, 7]), 2, 32, 8, 3, torch.Generator().manual_seed(0))
    assert (cluttered.flatten(1) > 0).sum(1).min() >= 16


def test_shuffling_is_fixed_by_seed_and_epoch():
    torch.manual_seed(5)
    dm = _small()
    dm.setup()
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(3)
    order = list(sampler)
    torch.rand(100)  # other random draws do not change the order
    assert list(sampler) == order
    sampler.set_epoch(4)
    assert list(sampler) != order and sorted(list(sampler)) == sorted(order)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 5}, "data.num_classes=5: the digits dataset has exactly 10 classes"),
        ({"digit_size": 40}, "data.digit_size=40 must lie between 8"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum to less than 1"),
        ({"batch_size": 0}, "data.batch_size=0: expected a positive integer"),
    ],
)
def test_invalid_settings_name_the_config_key(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _small(**kwargs)
