"""The tensor auto-augment ops against timm's PIL ops: pixels at fixed magnitudes, draws at random ones."""

from __future__ import annotations

import collections
import math
import random
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data import create_transform
from torchvision.transforms import ColorJitter as TorchvisionColorJitter

from das_lab.data import tensor_augment
from das_lab.data.tensor_augment import TENSOR_OPS, ColorJitter, augment_ops
from das_lab.data.transforms import build_train_transform, posterize

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean
DAT_PAPER = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "interpolation": "bicubic",
    "re_prob": 0.25,
    "re_mode": "pixel",
    "re_count": 1,
}


def _photo(height: int = 24, width: int = 32) -> np.ndarray:
    """Smooth gradients plus mild noise, values kept off 0 and 255 (a small photo-like image)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 5 + y * 2, y * 7 + 10, (x + y) * 3 + 40], -1) % 200 + 25
    return np.clip(base + np.random.default_rng(0).normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def _pil_op(name: str, image: np.ndarray, args: tuple, resample: Any) -> np.ndarray:
    function = posterize if name.startswith("Posterize") else timm_aa.NAME_TO_OP[name]
    return np.asarray(function(Image.fromarray(image), *args, fillcolor=FILL, resample=resample))


def _tensor_op(name: str, image: np.ndarray, args: tuple, resample: Any) -> np.ndarray:
    out = TENSOR_OPS[name](
        torch.from_numpy(image).permute(2, 0, 1).contiguous(), *args, fillcolor=FILL, resample=resample
    )
    assert out.dtype == torch.uint8 and out.shape == (3, *image.shape[:2])
    return out.permute(1, 2, 0).numpy()


EXACT = {
    "AutoContrast": [()],
    "Equalize": [()],
    "Invert": [()],
    "PosterizeIncreasing": [(0,), (1,), (3,), (4,)],
    "PosterizeOriginal": [(4,), (8,)],
    "SolarizeIncreasing": [(0,), (26,), (128,), (256,)],
    "SolarizeAdd": [(0,), (55,), (110,), (128,)],
}
BLENDS = {
    name: [(0.1,), (0.55,), (1.0,), (1.9,)]
    for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
}
LINE_SHIFTS = {
    "ShearX": [(-0.3,), (0.13,), (0.3,)],
    "ShearY": [(-0.27,), (0.3,)],
    "TranslateXRel": [(-0.45,), (0.137,), (0.45,)],
    "TranslateYRel": [(-0.2,), (0.45,)],
    "TranslateX": [(-7.25,), (100.0,)],
}


def test_pointwise_ops_match_pil_exactly_and_blends_within_one_level() -> None:
    image = _photo()
    for name, arg_list in {**EXACT, **BLENDS}.items():
        for args in arg_list:
            diff = np.abs(_pil_op(name, image, args, None).astype(int) - _tensor_op(name, image, args, None))
            assert diff.max() <= (0 if name in EXACT else 1), (name, args, diff.max())
            assert (diff > 0).mean() <= 0.01, (name, args)
    assert not _tensor_op("PosterizeIncreasing", image, (0,), None).any()  # 0 bits: black, das-lab's rule


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR], ids=["bicubic", "bilinear"])
def test_shears_and_translations_match_pil_within_one_level(resample: Image.Resampling) -> None:
    """Pillow's affine kernels reduce to 1-D ones for these ops; float32 vs double can flip a truncation."""
    image = _photo()
    for name, arg_list in LINE_SHIFTS.items():
        for args in arg_list:
            pil, ours = _pil_op(name, image, args, resample), _tensor_op(name, image, args, resample)
            diff = np.abs(pil.astype(int) - ours)
            assert diff.max() <= 1 and (diff > 0).mean() <= 0.05, (name, args, diff.max(), (diff > 0).mean())
            assert np.array_equal((pil == FILL).all(-1), (ours == FILL).all(-1)), (name, args)  # same fill region


def test_rotate_matches_pil_bilinear_and_stays_close_to_its_bicubic() -> None:
    """Rotation runs on grid_sample: bilinear is Pillow's kernel; bicubic is Keys a=-0.75 where Pillow
    uses a=-1, a difference bounded here on a photo-like image (measured: max 2 levels, mean < 0.3)."""
    image = _photo()
    for degrees in (-30.0, -7.3, 12.1, 30.0):
        for resample, max_diff, mean_diff in ((Image.Resampling.BILINEAR, 1, 0.01), (Image.Resampling.BICUBIC, 4, 0.5)):
            pil, ours = (
                _pil_op("Rotate", image, (degrees,), resample),
                _tensor_op("Rotate", image, (degrees,), resample),
            )
            diff = np.abs(pil.astype(int) - ours)
            assert diff.max() <= max_diff and diff.mean() <= mean_diff, (degrees, resample, diff.max(), diff.mean())
            assert np.array_equal((pil == FILL).all(-1), (ours == FILL).all(-1)), (degrees, resample)
    assert np.array_equal(_tensor_op("Rotate", image, (0.0,), Image.Resampling.BICUBIC), image)


def test_random_interpolation_is_drawn_per_call_like_timm() -> None:
    """timm's 'random' interpolation hands ops (BILINEAR, BICUBIC) and they draw one per call with random.choice."""
    image = torch.from_numpy(_photo()).permute(2, 0, 1).contiguous()
    choices = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
    random.seed(3)
    drawn = [random.choice(choices) for _ in range(6)]
    random.seed(3)
    outputs = [tensor_augment.rotate(image, 11.0, FILL, choices) for _ in range(6)]
    for resample, out in zip(drawn, outputs):
        assert torch.equal(out, tensor_augment.rotate(image, 11.0, FILL, resample))
    with pytest.raises(ValueError, match="tensor augment ops support bilinear and bicubic"):
        tensor_augment.rotate(image, 11.0, FILL, Image.Resampling.NEAREST)


def _record_draws(transform: Any, calls: int) -> list[tuple]:
    """(op name, magnitude, level args, fill, interpolation) of every op applied in ``calls`` calls, without images."""
    draws: list[tuple] = []
    for op in augment_ops(transform):

        def level_fn(magnitude, hparams, op=op, level_fn=op.level_fn):
            op.magnitude_drawn = magnitude
            return level_fn(magnitude, hparams) if level_fn is not None else ()

        def aug_fn(image, *args, op=op, **kwargs):
            draws.append((op.name, round(op.magnitude_drawn, 9), args, kwargs["fillcolor"], kwargs["resample"]))
            return image

        op.level_fn, op.aug_fn = level_fn, aug_fn
    for _ in range(calls):
        transform(object())
    return draws


def _timm_and_das_lab_augment(config: str, size: int = 224) -> tuple[Any, Any]:
    timm_steps = create_transform(size, is_training=True, auto_augment=config, interpolation="bicubic").transforms
    das_steps = build_train_transform(size, {"auto_augment": config, "interpolation": "bicubic"}).transforms
    (timm_augment,) = [step for step in timm_steps if isinstance(step, (timm_aa.RandAugment, timm_aa.AutoAugment))]
    (das_augment,) = [step for step in das_steps if isinstance(step, (timm_aa.RandAugment, timm_aa.AutoAugment))]
    assert all(op.aug_fn is TENSOR_OPS[op.name] for op in augment_ops(das_augment))
    return timm_augment, das_augment


@pytest.mark.parametrize(
    "config",
    ["rand-m9-mstd0.5-inc1", "rand-m1-mstd2-inc1", "rand-m5-mstd101", "rand-m9-n3-p0.8-mmax12-mstd1", "v0r-mstd0.5"],
)
def test_auto_augment_draws_what_timm_create_transform_draws(config: str) -> None:
    """Same seeds, same sequence of ops, magnitudes, level args, fill and interpolation as timm's PIL pipeline."""
    timm_augment, das_augment = _timm_and_das_lab_augment(config)
    sequences = []
    for augment in (timm_augment, das_augment):
        random.seed(0)
        np.random.seed(0)
        sequences.append(_record_draws(augment, 1000))
    assert sequences[0] == sequences[1] and len(sequences[0]) > 300
    assert {fill for *_, fill, _ in sequences[1]} == {FILL}
    assert {resample for *_, resample in sequences[1]} == {Image.Resampling.BICUBIC}


def test_dat_recipe_draws_reach_every_op_and_the_magnitude_edges() -> None:
    """8000 images' draws of rand-m9-mstd0.5-inc1 (no pixels): op frequencies, magnitude noise clamped at 10,
    posterize to 0 bits, solarize at threshold 0; rand-m1-mstd2 clamps at 0 (no-op levels)."""
    _, das_augment = _timm_and_das_lab_augment("rand-m9-mstd0.5-inc1")
    random.seed(1)
    np.random.seed(1)
    draws = _record_draws(das_augment, 8000)
    counts = collections.Counter(name for name, *_ in draws)
    assert set(counts) == set(timm_aa._RAND_INCREASING_TRANSFORMS)
    expected = 8000 * 2 * 0.5 / 15  # two layers, each op applied with probability 0.5
    assert all(abs(n - expected) < 5 * math.sqrt(expected) for n in counts.values()), counts
    magnitudes = np.array([magnitude for _, magnitude, *_ in draws])
    assert magnitudes.max() == 10.0 and 0.01 < (magnitudes == 10.0).mean() < 0.04  # P(N(9, 0.5) >= 10) = 0.023
    assert abs(magnitudes.mean() - 9.0) < 0.05
    args = collections.defaultdict(set)
    for name, _, level_args, *_ in draws:
        args[name].add(level_args[0] if level_args else None)
    assert 0 in args["PosterizeIncreasing"] and args["PosterizeIncreasing"] <= {0, 1, 2}
    assert 0 in args["SolarizeIncreasing"] and max(args["SolarizeIncreasing"]) <= 256
    assert max(args["SolarizeAdd"]) == 110
    assert max(args["Rotate"]) == 30.0 and min(args["Rotate"]) == -30.0

    _, low_augment = _timm_and_das_lab_augment("rand-m1-mstd2-inc1")
    low = _record_draws(low_augment, 1000)
    assert 0.2 < np.mean([magnitude == 0.0 for _, magnitude, *_ in low]) < 0.4  # P(N(1, 2) <= 0) = 0.31
    assert {
        level_args for name, magnitude, level_args, *_ in low if name == "SolarizeIncreasing" and magnitude == 0.0
    } == {(256,)}


def test_random_erasing_of_the_dat_recipe_draws_boxes_to_every_edge() -> None:
    """4000 erasings on a 16x16 normalised zero image: probability 0.25, area 2-33%, aspect 0.3-3.3,
    per-pixel N(0, 1) noise, boxes touching each edge of the image."""
    (erasing,) = [
        step for step in build_train_transform(16, DAT_PAPER).transforms if type(step).__name__ == "RandomErasing"
    ]
    random.seed(0)
    torch.manual_seed(0)
    boxes, noise = [], []
    for _ in range(4000):
        out = erasing(torch.zeros(3, 16, 16))
        erased = (out != 0).any(0)
        if erased.any():
            rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
            boxes.append((int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])))
            noise.append(out[:, erased])
    assert 4000 * 0.25 - 100 < len(boxes) < 4000 * 0.25 + 100
    heights = np.array([bottom - top + 1 for top, bottom, _, _ in boxes])
    widths = np.array([right - left + 1 for _, _, left, right in boxes])
    areas = heights * widths / 256
    assert areas.min() >= 0.01 and areas.max() <= 0.4 and (widths < 16).all() and (heights < 16).all()
    assert (heights / widths).min() < 0.5 and (heights / widths).max() > 2
    assert any(top == 0 for top, *_ in boxes) and any(bottom == 15 for _, bottom, *_ in boxes)
    assert any(left == 0 for *_, left, _ in boxes) and any(right == 15 for *_, right in boxes)
    values = torch.cat(noise, 1)
    assert abs(float(values.mean())) < 0.05 and abs(float(values.std()) - 1) < 0.05


def test_colour_jitter_draws_like_torchvision_and_computes_like_pil() -> None:
    """Same torch seed: the order and factors of torchvision's ColorJitter, applied with PIL's arithmetic."""
    image = _photo()
    ours, reference = ColorJitter(0.4, 0.4, 0.4), TorchvisionColorJitter(0.4, 0.4, 0.4)
    for seed in range(20):
        torch.manual_seed(seed)
        out = ours(torch.from_numpy(image).permute(2, 0, 1).contiguous()).permute(1, 2, 0).numpy()
        torch.manual_seed(seed)
        expected = np.asarray(reference(Image.fromarray(image)))
        assert np.abs(out.astype(int) - expected).max() <= 1, seed
    assert not np.array_equal(out, image)


def test_every_op_runs_on_non_contiguous_tiny_images_like_pil() -> None:
    """A 5x4 channels-last view (a 3x3 sharpen window barely fits); rotate keeps its bicubic-kernel caveat."""
    image = torch.from_numpy(_photo(5, 4)).permute(2, 0, 1)
    assert not image.is_contiguous()
    representative = {
        **{name: arg_list[-1] for name, arg_list in {**EXACT, **BLENDS, **LINE_SHIFTS}.items()},
        "Rotate": (10.0,),
    }
    for name in TENSOR_OPS:
        args = next(representative[key] for key in (name, name + "Increasing", name + "Rel") if key in representative)
        out = TENSOR_OPS[name](image, *args, fillcolor=FILL, resample=Image.Resampling.BILINEAR)
        expected = _pil_op(name, np.ascontiguousarray(image.permute(1, 2, 0).numpy()), args, Image.Resampling.BILINEAR)
        assert out.shape == (3, 5, 4) and np.abs(out.permute(1, 2, 0).numpy().astype(int) - expected).max() <= 1, name
