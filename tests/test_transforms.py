"""Recipes (conf/recipe) and the train/eval transforms they build."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from das_lab.data.decode import decode_rgb
from das_lab.data.tensor_augment import TENSOR_OPS, ColorJitter
from das_lab.data.tensor_augment import posterize as tensor_posterize
from das_lab.data.transforms import (
    TRAIN_AUGMENT_KEYS,
    TimmPILTransform,
    augment_ops,
    build_eval_transform,
    build_train_transform,
    posterize,
)
from das_lab.data.verify import compose_config
from fake_datasets import DOG_BREEDS, make_stanford_dogs

CONF = Path(__file__).resolve().parents[1] / "conf"
RECIPES = ("basic", "das_paper", "dat_paper")


def _flatten(transform) -> list:
    ops = []
    for op in getattr(transform, "transforms", [transform]):
        ops.extend(_flatten(op) if hasattr(op, "transforms") else [op])
    return ops


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_set_every_augment_key_and_compose_with_both_datasets(recipe: str, tmp_path: Path) -> None:
    augment = OmegaConf.load(CONF / "recipe" / f"{recipe}.yaml").data.train_augment
    assert set(augment) == TRAIN_AUGMENT_KEYS
    for data in ("stanford_dogs", "imagenet"):
        assert set(OmegaConf.load(CONF / "data" / f"{data}.yaml").train_augment) == TRAIN_AUGMENT_KEYS
        cfg = compose_config([f"data={data}", f"recipe={recipe}", f"data.root={tmp_path}"])
        datamodule = instantiate(cfg.data)
        assert datamodule.train_augment == OmegaConf.to_container(augment)
        assert datamodule.train_transform(torch.zeros(3, 50, 60, dtype=torch.uint8)).shape == (3, 224, 224)


def test_basic_and_das_recipes_run_on_uint8_tensors_without_pil() -> None:
    for recipe in ("basic", "das_paper"):
        augment = OmegaConf.to_container(OmegaConf.load(CONF / "recipe" / f"{recipe}.yaml").data.train_augment)
        ops = _flatten(build_train_transform(32, augment))
        assert [type(op) for op in ops] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]
        assert ops[0].scale == (0.08, 1.0)


def test_dat_recipe_is_timm_randaugment_on_tensors_with_erasing_and_mixup() -> None:
    """timm's order (crop, flip, RandAugment, to float, normalise, erase), no PIL, no colour jitter under RandAugment."""
    recipe = OmegaConf.load(CONF / "recipe" / "dat_paper.yaml")
    transform = build_train_transform(32, OmegaConf.to_container(recipe.data.train_augment))
    ops = _flatten(transform)
    assert [type(op) for op in ops] == [
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
        RandAugment,
        v2.ToDtype,
        v2.Normalize,
        RandomErasing,
    ]
    assert ops[0].interpolation == v2.InterpolationMode.BICUBIC
    rand_augment = ops[2]
    assert (
        rand_augment.num_layers == 2 and rand_augment.ops[0].magnitude == 9 and rand_augment.ops[0].magnitude_std == 0.5
    )
    assert [op.name for op in rand_augment.ops] == _RAND_INCREASING_TRANSFORMS
    assert all(op.aug_fn is TENSOR_OPS[op.name] and op.prob == 0.5 for op in rand_augment.ops)
    assert rand_augment.ops[0].kwargs == {"fillcolor": (124, 116, 104), "resample": Image.Resampling.BICUBIC}
    erasing = ops[5]
    assert erasing.probability == 0.25 and erasing.mode == "pixel" and erasing.max_count == 1
    out = transform(torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    mixup = instantiate(OmegaConf.merge({"data": {"num_classes": 10}}, recipe).task.mixup)
    assert isinstance(mixup, Mixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing, mixup.num_classes) == (0.8, 1.0, 0.1, 10)
    _, targets = mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert targets.shape == (4, 10) and torch.allclose(targets.sum(1), torch.ones(4))
    assert recipe.task.label_smoothing == 0.1


def test_eval_resizes_to_size_over_crop_pct_then_centre_crops() -> None:
    image = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8)
    out = build_eval_transform(28, 0.875, "bilinear")(image)
    resized = F.resize(image, [32, 48], antialias=True)
    assert math.floor(28 / 0.875) == 32
    reference = (
        F.center_crop(resized, [28, 28]).float() / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    ) / torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    assert out.shape == (3, 28, 28)
    assert torch.allclose(out, reference, atol=1e-5)


def test_unknown_augment_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['mixup'\]"):
        build_train_transform(32, {"mixup": 0.8})


def test_decode_rejects_garbage_and_reads_bmp_through_pillow(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "a.bmp")
    assert (
        decode_rgb((tmp_path / "a.bmp").read_bytes()).tolist()
        == torch.tensor([10, 20, 30])[:, None, None].expand(3, 4, 5).tolist()
    )
    with pytest.raises(RuntimeError, match="x.jpg: cannot decode image"):
        decode_rgb(b"\xff\xd8garbage", "x.jpg")


def test_posterize_keeps_high_bits_and_zero_bits_is_black() -> None:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert np.array_equal(np.asarray(posterize(image, 3)), pixels & 0b11100000)
    assert posterize(image, 8) is image
    for bits in (0, -2):
        black = posterize(image, bits)
        assert black.mode == "RGB" and black.size == (7, 5) and not np.asarray(black).any()


@pytest.mark.parametrize(
    ("auto_augment", "kernel"),
    [
        ("rand-m9-mstd0.5-inc1", tensor_posterize),
        ("rand-m9-mstd0.5", tensor_posterize),
        ("v0r-mstd0.5", tensor_posterize),
        ("augmix-m5-w3-d2", posterize),
    ],
)
def test_every_timm_augment_policy_posterizes_through_das_lab(auto_augment: str, kernel) -> None:
    transform = build_train_transform(8, {"auto_augment": auto_augment, "interpolation": "bicubic"})
    posterize_ops = [op for op in augment_ops(transform) if op.name.startswith("Posterize")]
    assert posterize_ops and all(op.aug_fn is kernel for op in posterize_ops)


@pytest.mark.parametrize(
    ("augment", "reason"),
    [
        ({"auto_augment": "augmix-m5-w3-d2"}, r"auto_augment='augmix-m5-w3-d2' is AugMix"),
        ({"auto_augment": "rand-m9-t3a"}, r"ops without a tensor kernel: Desaturate, GaussianBlur"),
        ({"color_jitter": [0.4, 0.4, 0.4, 0.1]}, r"jitters hue"),
        ({"interpolation": "random", "auto_augment": "rand-m9"}, r"interpolation='random'"),
    ],
)
def test_recipes_without_tensor_kernels_run_timm_pil_pipeline_and_say_why(augment: dict, reason: str, caplog) -> None:
    with caplog.at_level("INFO", logger="das_lab.data.transforms"):
        transform = build_train_transform(8, {"interpolation": "bicubic", **augment})
    assert isinstance(transform, TimmPILTransform) and re.search(reason, transform.reason)
    assert re.search(reason, caplog.text) and "running timm's PIL pipeline" in caplog.text
    out = transform(torch.randint(0, 256, (3, 12, 10), dtype=torch.uint8))
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32


def test_colour_jitter_without_auto_augment_runs_on_tensors() -> None:
    ops = _flatten(build_train_transform(8, {"color_jitter": 0.4, "hflip": 0.5, "interpolation": "bilinear"}))
    assert [type(op) for op in ops] == [
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
        ColorJitter,
        v2.ToDtype,
        v2.Normalize,
    ]
    assert ops[2].sampler.brightness == ops[2].sampler.saturation == (0.6, 1.4)


def test_dat_recipe_posterize_at_magnitude_ten_is_a_black_image_not_an_error() -> None:
    """m9 with mstd0.5 reaches magnitude 10 (0 bits) in about 2% of draws; Pillow >= 12 refuses 0 bits."""
    augment = OmegaConf.to_container(OmegaConf.load(CONF / "recipe" / "dat_paper.yaml").data.train_augment)
    (op,) = [op for op in augment_ops(build_train_transform(8, augment)) if op.name.startswith("Posterize")]
    assert op.name == "PosterizeIncreasing" and op.level_fn(10, op.hparams) == (0,)
    image = torch.full((3, 4, 4), 200, dtype=torch.uint8)
    random.seed(0)
    outputs = [op(image) for _ in range(3000)]
    black = sum(not out.any() for out in outputs)
    assert 20 <= black <= 120  # ~0.5 (op applied) * 0.023 (magnitude >= 10) * 3000 = 34
    assert all(out.shape == (3, 4, 4) for out in outputs)


def test_dat_recipe_train_pipeline_survives_zero_bit_posterize(tmp_path: Path) -> None:
    """Many passes of the real train dataset of data=stanford_dogs recipe=dat_paper, until 0 bits is drawn."""
    fake = make_stanford_dogs(tmp_path / "dogs")
    cfg = compose_config(
        [
            "data=stanford_dogs",
            "recipe=dat_paper",
            f"data.root={fake.root}",
            f"data.cache_dir={tmp_path}",
            f"data.num_classes={len(DOG_BREEDS)}",
            "data.image_size=8",
            "data.num_workers=0",
            "data.pin_memory=false",
        ]
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    (op,) = [op for op in augment_ops(datamodule.train_transform) if op.name.startswith("Posterize")]
    bits_drawn: list[int] = []

    def recording_level_fn(magnitude, hparams, level_fn=op.level_fn):
        level_args = level_fn(magnitude, hparams)
        bits_drawn.append(level_args[0])
        return level_args

    op.level_fn = recording_level_fn
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loader = datamodule.train_dataloader()
    for epoch in range(300):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            assert images.shape[1:] == (3, 8, 8) and torch.isfinite(images).all()
        if 0 in bits_drawn:
            break
    assert 0 in bits_drawn, f"0 bits never drawn in {len(bits_drawn)} posterize calls"
