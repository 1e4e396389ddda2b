"""Train and eval transforms from a recipe's ``data.train_augment`` keys, on uint8 tensors where timm's ops allow.

``train_augment`` holds keyword arguments of timm's ``create_transform`` (``scale``, ``ratio``,
``hflip``, ``vflip``, ``color_jitter``, ``auto_augment``, ``interpolation``, ``re_prob``,
``re_mode``, ``re_count``); ``conf/recipe/*.yaml`` set them. Inputs are the uint8 RGB tensors of
``das_lab.data.decode``. The training transform is the tensor pipeline whenever every part of the
recipe has a tensor kernel: random-resized crop and flips as torchvision v2, RandAugment (any
``rand-*`` string) and AutoAugment policies as timm's own op objects driving
``das_lab.data.tensor_augment``'s kernels, colour jitter (brightness, contrast, saturation) with
PIL's arithmetic, then normalisation and timm's ``RandomErasing`` on the float tensor: what timm's
``create_transform`` does, in the same order, with the same parameter draws, without PIL.
Recipes the tensor ops do not cover (AugMix, the '3a' ops, hue jitter, other interpolations) run
``TimmPILTransform``: timm's own PIL pipeline, whose reason is logged once and kept in its repr.
With ``normalize=False`` both paths stop at the uint8 tensor (timm's ``create_transform`` has the same
switch) and ``BatchNormalize`` does the rest on a whole batch, wherever it is: float conversion,
normalisation and, in training, timm's ``RandomErasing`` with its per-image draws (timm's batched call).
Posterizing to 0 bits is a black image on both paths: timm's RandAugment asks Pillow for 0 bits
at magnitude 10 (``PosterizeIncreasing``, reached by ``mstd`` noise around m9), which Pillow >= 12
refuses with a ValueError, so the PIL path's posterize ops use das-lab's ``posterize``. Eval
resizes the shorter side to ``image_size / crop_pct`` and centre-crops ``image_size``
(``crop_pct=0.875``: 256 -> 224).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from das_lab.data.tensor_augment import ColorJitter, NoTensorKernel, augment_ops, tensor_auto_augment

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]

TRAIN_AUGMENT_KEYS = frozenset(
    {
        "scale",
        "ratio",
        "hflip",
        "vflip",
        "color_jitter",
        "auto_augment",
        "interpolation",
        "re_prob",
        "re_mode",
        "re_count",
    }
)
_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def _interpolation(name: str) -> InterpolationMode:
    if name not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={name!r}: expected one of {sorted(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[name]


def _to_normalized_float(mean: tuple[float, ...], std: tuple[float, ...], inplace: bool = False) -> list[Any]:
    # inplace: normalise ToDtype's new float tensor (same arithmetic, one allocation fewer); uint8 inputs only,
    # as ToDtype hands a float32 input back itself
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std), inplace=inplace)]


def posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` high bits of every channel; 0 or fewer bits is a black image, 8 or more the image itself."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def use_safe_posterize(transform: Transform) -> Transform:
    """Point timm's posterize ops (Posterize, PosterizeIncreasing, PosterizeOriginal) at das-lab's ``posterize``."""
    for op in augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return transform


def auto_augment_hparams(image_size: int, interpolation: str, mean: tuple[float, ...]) -> dict[str, Any]:
    """The hparams timm's ``create_transform`` gives its auto-augment ops: translate range, fill colour, interpolation."""
    return {
        "translate_const": int(image_size * 0.45),
        "img_mean": tuple(min(255, round(255 * x)) for x in mean),
        "interpolation": str_to_pil_interp(interpolation),
    }


def _colour_jitter_factors(color_jitter: Any) -> tuple[float, ...]:
    if isinstance(color_jitter, (list, tuple)):
        return tuple(float(x) for x in color_jitter)
    return (float(color_jitter),) * 3


def _tensor_colour_step(
    augment: Mapping[str, Any], image_size: int, mean: tuple[float, ...]
) -> tuple[Optional[Transform], str]:
    """The auto-augment or colour-jitter step of the tensor pipeline, or (None, why the tensor ops cannot run it)."""
    interpolation = augment.get("interpolation", "bilinear")
    if interpolation not in _INTERPOLATIONS:
        return None, f"interpolation={interpolation!r} (the tensor pipeline has {sorted(_INTERPOLATIONS)})"
    policy = augment.get("auto_augment")
    if policy:
        # timm switches colour jitter off under auto-augment (its '3a' ops, which keep it, run on PIL)
        try:
            return tensor_auto_augment(policy, auto_augment_hparams(image_size, interpolation, mean)), ""
        except NoTensorKernel as error:
            return None, str(error)
    factors = _colour_jitter_factors(augment.get("color_jitter") or 0.0)
    if len(factors) == 4 and factors[3]:
        return (
            None,
            f"color_jitter={list(factors)} jitters hue (the tensor pipeline has brightness, contrast, saturation)",
        )
    if not any(factors[:3]):
        return None, ""
    return ColorJitter(*factors[:3]), ""


class TimmPILTransform:
    """timm's own ``create_transform`` pipeline on a PIL copy of the tensor, for recipes the tensor ops do not cover."""

    def __init__(self, timm_transform: Transform, reason: str) -> None:
        self.timm_transform = use_safe_posterize(timm_transform)
        self.reason = reason

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.timm_transform(F.to_pil_image(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, transform={self.timm_transform!r})"


def random_erasing(augment: Mapping[str, Any], device: Union[str, torch.device]) -> Optional[RandomErasing]:
    """timm's RandomErasing with the recipe's ``re_prob``, ``re_mode`` and ``re_count`` (None: the recipe does not erase).

    ``device`` is where timm draws the noise of 'rand' and 'pixel' erasing: the device of the images.
    """
    if augment.get("re_prob", 0.0) <= 0:
        return None
    return RandomErasing(
        augment["re_prob"], mode=augment.get("re_mode", "const"), max_count=augment.get("re_count", 1), device=device
    )


def build_train_transform(
    image_size: int,
    augment: Mapping[str, Any],
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    normalize: bool = True,
) -> Transform:
    """The training transform of a recipe: uint8 RGB tensor in, normalized (and erased) float tensor out.

    ``normalize=False`` stops at the augmented uint8 tensor, for ``BatchNormalize`` after transfer.
    """
    unknown = set(augment) - TRAIN_AUGMENT_KEYS
    if unknown:
        raise ValueError(
            f"data.train_augment has unknown key(s) {sorted(unknown)}; expected a subset of {sorted(TRAIN_AUGMENT_KEYS)}"
        )
    scale = tuple(augment.get("scale") or (0.08, 1.0))
    ratio = tuple(augment.get("ratio") or (3 / 4, 4 / 3))
    colour_step, fallback_reason = _tensor_colour_step(augment, image_size, mean)
    if fallback_reason:
        log.info("data.train_augment: %s; running timm's PIL pipeline", fallback_reason)
        kwargs = {key: value for key, value in augment.items() if value is not None}
        kwargs.update(scale=scale, ratio=ratio)
        return TimmPILTransform(
            create_transform(image_size, is_training=True, mean=mean, std=std, normalize=normalize, **kwargs),
            fallback_reason,
        )
    ops: list[Any] = [
        v2.RandomResizedCrop(
            image_size,
            scale=scale,
            ratio=ratio,
            interpolation=_interpolation(augment.get("interpolation", "bilinear")),
            antialias=True,
        )
    ]
    if augment.get("hflip", 0.0) > 0:
        ops.append(v2.RandomHorizontalFlip(augment["hflip"]))
    if augment.get("vflip", 0.0) > 0:
        ops.append(v2.RandomVerticalFlip(augment["vflip"]))
    if colour_step is not None:
        ops.append(colour_step)
    if normalize:
        ops += _to_normalized_float(mean, std)
        erasing = random_erasing(augment, "cpu")
        if erasing is not None:
            ops.append(erasing)
    return v2.Compose(ops)


def build_eval_transform(
    image_size: int,
    crop_pct: float,
    interpolation: str,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    normalize: bool = True,
) -> Transform:
    """Resize the shorter side to image_size / crop_pct, centre-crop, normalize (the papers' eval).

    ``normalize=False`` stops at the uint8 crop, for ``BatchNormalize`` after transfer.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"data.crop_pct={crop_pct}: expected a fraction in (0, 1], e.g. 0.875")
    resize = math.floor(image_size / crop_pct)
    ops: list[Any] = [
        v2.Resize(resize, interpolation=_interpolation(interpolation), antialias=True),
        v2.CenterCrop(image_size),
    ]
    return v2.Compose(ops + _to_normalized_float(mean, std) if normalize else ops)


class BatchNormalize:
    """The steps ``normalize=False`` leaves out, on a whole uint8 batch wherever it lies: to float, normalise, erase.

    ``augment`` is the recipe of a training batch (its ``re_*`` keys drive timm's RandomErasing, one
    draw per image as in timm's batched call); ``None`` for evaluation batches.
    """

    def __init__(
        self,
        augment: Optional[Mapping[str, Any]] = None,
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    ) -> None:
        self.to_normalized_float = v2.Compose(_to_normalized_float(mean, std, inplace=True))
        self.augment = dict(augment or {})

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(
                f"BatchNormalize takes the uint8 batches (N, 3, H, W) of transforms built with normalize=False; "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        images = self.to_normalized_float(images)
        erasing = random_erasing(self.augment, images.device)
        return images if erasing is None else erasing(images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_normalized_float!r}, erasing={random_erasing(self.augment, 'cpu')!r})"


def normalize_augment(augment: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict of the recipe keys (Hydra passes a DictConfig)."""
    if isinstance(augment, DictConfig):
        return OmegaConf.to_container(augment, resolve=True)
    return dict(augment)
