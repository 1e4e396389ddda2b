"""Train and eval transforms from a recipe's ``data.train_augment`` keys, fast where the recipe allows.

``train_augment`` holds keyword arguments of timm's ``create_transform`` (``scale``, ``ratio``,
``hflip``, ``vflip``, ``color_jitter``, ``auto_augment``, ``interpolation``, ``re_prob``,
``re_mode``, ``re_count``); ``conf/recipe/*.yaml`` set them. Inputs are the uint8 RGB tensors of
``das_lab.data.decode``. A recipe of only random-resized-crop and flips runs as torchvision
transforms v2 on those tensors (no PIL round trip); a recipe with colour jitter, RandAugment /
AutoAugment or random erasing runs timm's own ``create_transform`` pipeline, so the recipe means
exactly what it means in timm, with one exception: posterizing to 0 bits. timm's RandAugment
asks Pillow for 0 bits at magnitude 10 (``PosterizeIncreasing``, reached by ``mstd`` noise around
m9) and means a black image, which Pillow >= 12 refuses with a ValueError; das-lab's
``posterize`` replaces timm's in every augment op of the pipeline and returns that black image
itself, whatever Pillow is installed. Eval resizes the shorter side to ``image_size / crop_pct`` and
centre-crops ``image_size`` (``crop_pct=0.875``: 256 -> 224).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torchvision.transforms import InterpolationMode, v2

Transform = Callable[[torch.Tensor], torch.Tensor]

TRAIN_AUGMENT_KEYS = frozenset(
    {"scale", "ratio", "hflip", "vflip", "color_jitter", "auto_augment", "interpolation", "re_prob", "re_mode", "re_count"}
)
_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def _interpolation(name: str) -> InterpolationMode:
    if name not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={name!r}: expected one of {sorted(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[name]


def _to_normalized_float(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Any]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` high bits of every channel; 0 or fewer bits is a black image, 8 or more the image itself."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def augment_ops(transform: Any) -> Iterator[auto_augment.AugmentOp]:
    """Every timm AugmentOp inside a transform: RandAugment's ops, AutoAugment's policies, AugMix's ops."""
    if isinstance(transform, auto_augment.AugmentOp):
        yield transform
        return
    if isinstance(transform, (list, tuple)):
        children: list[Any] = list(transform)
    else:
        children = [getattr(transform, name, ()) for name in ("transforms", "ops", "policy")]
    for child in children:
        yield from augment_ops(child)


def use_safe_posterize(transform: Transform) -> Transform:
    """Point timm's posterize ops (Posterize, PosterizeIncreasing, PosterizeOriginal) at das-lab's ``posterize``."""
    for op in augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return transform


def uses_tensor_fast_path(augment: Mapping[str, Any]) -> bool:
    """True when the recipe needs nothing beyond crop and flips, so v2 on uint8 tensors reproduces it."""
    return (
        not augment.get("color_jitter")
        and not augment.get("auto_augment")
        and not augment.get("re_prob")
        and augment.get("interpolation", "bilinear") in _INTERPOLATIONS
    )


def build_train_transform(
    image_size: int,
    augment: Mapping[str, Any],
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> Transform:
    """The training transform of a recipe: uint8 RGB tensor in, normalized float tensor out."""
    unknown = set(augment) - TRAIN_AUGMENT_KEYS
    if unknown:
        raise ValueError(
            f"data.train_augment has unknown key(s) {sorted(unknown)}; expected a subset of {sorted(TRAIN_AUGMENT_KEYS)}"
        )
    scale = tuple(augment.get("scale") or (0.08, 1.0))
    ratio = tuple(augment.get("ratio") or (3 / 4, 4 / 3))
    if uses_tensor_fast_path(augment):
        ops: list[Any] = [
            v2.RandomResizedCrop(
                image_size, scale=scale, ratio=ratio,
                interpolation=_interpolation(augment.get("interpolation", "bilinear")), antialias=True,
            )
        ]
        if augment.get("hflip", 0.0) > 0:
            ops.append(v2.RandomHorizontalFlip(augment["hflip"]))
        if augment.get("vflip", 0.0) > 0:
            ops.append(v2.RandomVerticalFlip(augment["vflip"]))
        return v2.Compose(ops + _to_normalized_float(mean, std))
    kwargs = {key: value for key, value in augment.items() if value is not None}
    kwargs.update(scale=scale, ratio=ratio)
    timm_transform = create_transform(image_size, is_training=True, mean=mean, std=std, **kwargs)
    return v2.Compose([v2.ToPILImage(), use_safe_posterize(timm_transform)])


def build_eval_transform(
    image_size: int,
    crop_pct: float,
    interpolation: str,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> Transform:
    """Resize the shorter side to image_size / crop_pct, centre-crop, normalize (the papers' eval)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"data.crop_pct={crop_pct}: expected a fraction in (0, 1], e.g. 0.875")
    resize = math.floor(image_size / crop_pct)
    ops: list[Any] = [
        v2.Resize(resize, interpolation=_interpolation(interpolation), antialias=True),
        v2.CenterCrop(image_size),
    ]
    return v2.Compose(ops + _to_normalized_float(mean, std))


def normalize_augment(augment: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict of the recipe keys (Hydra passes a DictConfig)."""
    if isinstance(augment, DictConfig):
        return OmegaConf.to_container(augment, resolve=True)
    return dict(augment)
