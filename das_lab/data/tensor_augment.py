"""timm's auto-augment ops and colour jitter as kernels on uint8 CHW tensors, so paper recipes skip PIL.

timm's RandAugment / AutoAugment objects are built by timm itself (``rand_augment_transform``,
``auto_augment_transform``: op set, per-op probability, magnitude noise ``mstd``, clamp to
[0, ``mmax`` or 10], level functions, ``img_mean`` fill, interpolation), so op choices and
magnitudes are drawn exactly as timm draws them; ``tensor_auto_augment`` then points every op's
``aug_fn`` at the kernel below that computes what timm's PIL op computes, on a uint8 tensor.

Agreement with Pillow 13 (tests/test_tensor_augment.py measures it op by op):
- identical: Invert, Posterize (0 bits is a black image, das-lab's rule), Solarize, SolarizeAdd,
  AutoContrast, Equalize; Color, Contrast, Brightness, Sharpness (PIL's integer luma, rounded
  smoothing filter and truncating blend) within 1 level, measured identical;
- ShearX/Y, TranslateX/Y: Pillow's own affine kernels (cubic a = -1, bilinear) reduced to 1-D,
  within 1 level (float32 against Pillow's double), the same fill region;
- Rotate: ``grid_sample``; bilinear is Pillow's kernel (within 1 level), bicubic uses a = -0.75
  where Pillow uses a = -1: a couple of levels on photo-like images, more on pixel noise; the same
  fill region.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as nnf
from PIL import Image
from timm.data import auto_augment
from torchvision.transforms import ColorJitter as _TorchvisionColorJitter
from torchvision.transforms.v2 import functional as F

Kernel = Callable[..., torch.Tensor]

_GRID_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}


def _grid_mode(resample: Any) -> str:
    """grid_sample's mode for timm's ``resample``; a tuple is drawn from per call, as timm's PIL ops do."""
    if isinstance(resample, (list, tuple)):
        resample = random.choice(resample)
    if resample not in _GRID_MODES:
        raise ValueError(f"interpolation {resample!r}: the tensor augment ops support bilinear and bicubic")
    return _GRID_MODES[resample]


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> torch.Tensor:
    return torch.arange(size, dtype=torch.float64) + 0.5


def affine(image: torch.Tensor, matrix: Sequence[float], resample: Any, fillcolor: Sequence[int]) -> torch.Tensor:
    """Pillow's ``Image.transform(AFFINE)``: output pixel centre (x, y) samples the input at
    (a x + b y + c, d x + e y + f); samples outside the input take ``fillcolor``."""
    a, b, c, d, e, f = matrix
    _, height, width = image.shape
    xs, ys = _pixel_centres(width), _pixel_centres(height)
    x_in = (a * xs)[None, :] + (b * ys + c)[:, None]
    y_in = (d * xs)[None, :] + (e * ys + f)[:, None]
    outside = (x_in < 0) | (x_in >= width) | (y_in < 0) | (y_in >= height)
    grid = torch.empty(1, height, width, 2)
    torch.add((a * xs * (2 / width))[None, :], ((b * ys + c) * (2 / width) - 1)[:, None], out=grid[0, ..., 0])
    torch.add((d * xs * (2 / height))[None, :], ((e * ys + f) * (2 / height) - 1)[:, None], out=grid[0, ..., 1])
    sampled = nnf.grid_sample(
        image[None].float(), grid, mode=_grid_mode(resample), padding_mode="border", align_corners=False
    )[0]
    fill = torch.tensor(fillcolor, dtype=torch.float32).view(-1, 1, 1)
    return torch.where(outside, fill, sampled).clamp_(0, 255).to(torch.uint8)


def _line_taps(fraction: torch.Tensor, mode: str) -> tuple[tuple[int, ...], list[torch.Tensor]]:
    """Tap offsets and weights of Pillow's affine kernels at ``fraction`` (its cubic has a = -1)."""
    if mode == "bicubic":
        d = fraction
        d2, d3 = d * d, d * d * d
        return (-1, 0, 1, 2), [2 * d2 - d - d3, 1 - 2 * d2 + d3, d + d2 - d3, d3 - d2]
    return (0, 1), [1 - fraction, fraction]


def shift_lines(
    image: torch.Tensor, offsets: torch.Tensor, along_x: bool, resample: Any, fillcolor: Sequence[int]
) -> torch.Tensor:
    """An affine transform that moves each row (``along_x``) or column by its own amount: output (x, y)
    samples the input at x + offsets[y] (or y + offsets[x]). Pillow's arithmetic for ShearX/Y and
    TranslateX/Y: the other coordinate stays on pixel centres, where Pillow's 2-D kernel is this 1-D
    one; filtered with slices of a border-padded copy, then shifted by whole pixels with one gather."""
    if not along_x:
        return shift_lines(image.transpose(1, 2), offsets, True, resample, fillcolor).transpose(1, 2).contiguous()
    channels, height, width = image.shape
    whole = torch.floor(offsets)
    taps, weights = _line_taps((offsets - whole).float(), _grid_mode(resample))
    # filtered[:, y, q + 1] = sum_t w_t(y) * image[:, y, clamp(q + t)] for q in -1 .. width - 1: every
    # start a sample inside the image can have (those outside take the fill colour below)
    padded = nnf.pad(image.float(), (2, 2), mode="replicate")
    filtered = padded[..., 1 + taps[0] : 2 + taps[0] + width] * weights[0][None, :, None]
    for tap, weight in zip(taps[1:], weights[1:]):
        filtered.addcmul_(padded[..., 1 + tap : 2 + tap + width], weight[None, :, None])
    filtered = filtered.clamp_(0, 255).to(torch.uint8)  # Pillow clips and truncates each sample
    columns = torch.arange(width)
    if bool((whole == whole[0]).all()):
        shifted = filtered.index_select(2, (columns + (int(whole[0]) + 1)).clamp_(0, width))
    else:
        start = (columns[None, :] + (whole.long() + 1)[:, None]).clamp_(0, width)
        shifted = filtered.gather(2, start.expand(channels, height, width))
    x_in = (columns.double() + 0.5)[None, :] + offsets[:, None]
    outside = (x_in < 0) | (x_in >= width)
    for channel, value in enumerate(fillcolor):
        shifted[channel].masked_fill_(outside, value)
    return shifted


def shear_x(image: torch.Tensor, factor: float, fillcolor: Sequence[int], resample: Any) -> torch.Tensor:
    """timm's ShearX: x_in = x + factor * y (about the top-left corner, as in PIL)."""
    offsets = factor * (torch.arange(image.shape[-2], dtype=torch.float64) + 0.5)
    return shift_lines(image, offsets, True, resample, fillcolor)


def shear_y(image: torch.Tensor, factor: float, fillcolor: Sequence[int], resample: Any) -> torch.Tensor:
    """timm's ShearY: y_in = factor * x + y."""
    offsets = factor * (torch.arange(image.shape[-1], dtype=torch.float64) + 0.5)
    return shift_lines(image, offsets, False, resample, fillcolor)


def translate_x_abs(image: torch.Tensor, pixels: float, fillcolor: Sequence[int], resample: Any) -> torch.Tensor:
    """timm's TranslateX: the content moves left by ``pixels``."""
    offsets = torch.full((image.shape[-2],), float(pixels), dtype=torch.float64)
    return shift_lines(image, offsets, True, resample, fillcolor)


def translate_y_abs(image: torch.Tensor, pixels: float, fillcolor: Sequence[int], resample: Any) -> torch.Tensor:
    """timm's TranslateY: the content moves up by ``pixels``."""
    offsets = torch.full((image.shape[-1],), float(pixels), dtype=torch.float64)
    return shift_lines(image, offsets, False, resample, fillcolor)


def translate_x_rel(image: torch.Tensor, pct: float, fillcolor: Sequence[int], resample: Any) -> torch.Tensor:
    """timm's TranslateXRel: a fraction ``pct`` of the width."""
    return translate_x_abs(image, pct * image.shape[-1], fillcolor, resample)


def translate_y_rel(image: torch.Tensor, pct: float, fillcolor: Sequence[int], resample: Any) -> torch.Tensor:
    """timm's TranslateYRel: a fraction ``pct`` of the height."""
    return translate_y_abs(image, pct * image.shape[-2], fillcolor, resample)


def rotate(image: torch.Tensor, degrees: float, fillcolor: Sequence[int], resample: Any) -> torch.Tensor:
    """Pillow's ``Image.rotate``: counter-clockwise about the image centre, same size, the matrix rounded as Pillow does."""
    if degrees % 360.0 == 0:
        return image.clone()
    _, height, width = image.shape
    angle = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = width / 2, height / 2
    matrix = (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)
    return affine(image, matrix, resample, fillcolor)


def _apply_luts(image: torch.Tensor, luts: torch.Tensor) -> torch.Tensor:
    """Map every channel through its own 256-entry table (PIL's ``Image.point``)."""
    channels = image.shape[0]
    return torch.gather(luts.to(torch.uint8), 1, image.reshape(channels, -1).long()).view_as(image)


def auto_contrast(image: torch.Tensor, **_: Any) -> torch.Tensor:
    """PIL's ``ImageOps.autocontrast`` (cutoff 0): each channel stretched to 0-255, the table truncated as in PIL."""
    low = image.amin(dim=(1, 2)).double()
    high = image.amax(dim=(1, 2)).double()
    levels = torch.arange(256, dtype=torch.float64)
    flat = high <= low
    scale = torch.full_like(low, 255.0).div(torch.where(flat, 1.0, high - low))  # a true division, as PIL's
    luts = (levels * scale[:, None] - low[:, None] * scale[:, None]).trunc().clamp(0, 255)
    luts = torch.where(flat[:, None], levels, luts)
    return _apply_luts(image, luts)


def equalize(image: torch.Tensor, **_: Any) -> torch.Tensor:
    """PIL's ``ImageOps.equalize`` (torchvision's tensor kernel computes the same tables)."""
    return F.equalize(image)


def invert(image: torch.Tensor, **_: Any) -> torch.Tensor:
    """PIL's ``ImageOps.invert``."""
    return 255 - image


def posterize(image: torch.Tensor, bits_to_keep: int, **_: Any) -> torch.Tensor:
    """Keep the ``bits_to_keep`` high bits; 0 or fewer is a black image, 8 or more the image itself."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return torch.zeros_like(image)
    return image & ((0xFF << (8 - bits_to_keep)) & 0xFF)


def solarize(image: torch.Tensor, thresh: int, **_: Any) -> torch.Tensor:
    """PIL's ``ImageOps.solarize``: levels at or above ``thresh`` are inverted (256 leaves the image alone)."""
    if thresh > 255:
        return image
    return image ^ (image >= thresh).to(torch.uint8).neg_()  # x ^ 255 == 255 - x; where() is slow on uint8


def solarize_add(image: torch.Tensor, add: int, thresh: int = 128, **_: Any) -> torch.Tensor:
    """timm's SolarizeAdd: levels below ``thresh`` raised by ``add``, saturating at 255."""
    raised = image.to(torch.int16) + (image < thresh).to(torch.int16) * add
    return raised.clamp_(max=255).to(torch.uint8)


def _luma(image: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point, rounded)."""
    r, g, b = image.to(torch.int32).unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, image, factor)``: clipped to 0-255 and truncated."""
    degenerate = degenerate.float()
    return (degenerate + factor * (image.float() - degenerate)).clamp_(0, 255).to(torch.uint8)


def color(image: torch.Tensor, factor: float, **_: Any) -> torch.Tensor:
    """PIL's ``ImageEnhance.Color``: blend with the image's luma (0 = grey, 1 = unchanged)."""
    return _blend(_luma(image).expand_as(image), image, factor)


def contrast(image: torch.Tensor, factor: float, **_: Any) -> torch.Tensor:
    """PIL's ``ImageEnhance.Contrast``: blend with a flat image at the rounded mean luma."""
    mean = int(_luma(image).double().mean().item() + 0.5)
    return _blend(torch.full_like(image, mean), image, factor)


def brightness(image: torch.Tensor, factor: float, **_: Any) -> torch.Tensor:
    """PIL's ``ImageEnhance.Brightness`` (torchvision's tensor kernel computes the same)."""
    return F.adjust_brightness(image, factor)


def sharpness(image: torch.Tensor, factor: float, **_: Any) -> torch.Tensor:
    """PIL's ``ImageEnhance.Sharpness``: blend with PIL's SMOOTH filter (3x3, centre 5, sum 13, rounded;
    the one-pixel border is the image's own), in integer box sums rather than a float convolution."""
    pixels = image.to(torch.int16)
    rows = pixels[:, :, :-2] + pixels[:, :, 1:-1] + pixels[:, :, 2:]
    total = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4 * pixels[:, 1:-1, 1:-1]
    degenerate = image.float()
    degenerate[:, 1:-1, 1:-1] = (total.float() / 13).round_()
    return _blend(degenerate, image, factor)


TENSOR_OPS: dict[str, Kernel] = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "PosterizeIncreasing": posterize,
    "PosterizeOriginal": posterize,
    "Solarize": solarize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "ColorIncreasing": color,
    "Contrast": contrast,
    "ContrastIncreasing": contrast,
    "Brightness": brightness,
    "BrightnessIncreasing": brightness,
    "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x_abs,
    "TranslateY": translate_y_abs,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}


def augment_ops(transform: Any) -> Iterable[auto_augment.AugmentOp]:
    """Every timm AugmentOp inside a transform (RandAugment, AutoAugment, AugMix, also inside a TimmPILTransform)."""
    if isinstance(transform, auto_augment.AugmentOp):
        yield transform
        return
    if isinstance(transform, (list, tuple)):
        children: list[Any] = list(transform)
    else:
        children = [getattr(transform, name, ()) for name in ("transforms", "ops", "policy", "timm_transform")]
    for child in children:
        yield from augment_ops(child)


class NoTensorKernel(ValueError):
    """An auto-augment config with a part that has no tensor kernel; the message names it."""


def tensor_auto_augment(config: str, hparams: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """timm's RandAugment / AutoAugment for ``config`` (built by timm, so drawn as timm draws it) running on uint8 tensors."""
    if config.startswith("augmix"):
        raise NoTensorKernel(f"auto_augment={config!r} is AugMix, which mixes PIL images (no tensor kernel)")
    if config.startswith("rand"):
        transform = auto_augment.rand_augment_transform(config, dict(hparams))
    else:
        transform = auto_augment.auto_augment_transform(config, dict(hparams))
    ops = list(augment_ops(transform))
    missing = sorted({op.name for op in ops} - set(TENSOR_OPS))
    if missing:
        raise NoTensorKernel(f"auto_augment={config!r} has ops without a tensor kernel: {', '.join(missing)}")
    for op in ops:
        op.aug_fn = TENSOR_OPS[op.name]
    return transform


class ColorJitter:
    """torchvision's ColorJitter (brightness, contrast, saturation; random order and factors drawn by
    torchvision) with PIL's arithmetic on uint8 tensors, as timm's PIL pipeline applies it."""

    def __init__(self, brightness: float, contrast: float, saturation: float) -> None:
        self.sampler = _TorchvisionColorJitter(brightness, contrast, saturation)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        s = self.sampler
        order, b, c, sat, _ = s.get_params(s.brightness, s.contrast, s.saturation, None)
        kernels = {0: (brightness, b), 1: (contrast, c), 2: (color, sat)}
        for index in order.tolist():
            kernel, factor = kernels.get(index, (None, None))
            if factor is not None:
                image = kernel(image, factor)
        return image

    def __repr__(self) -> str:
        s = self.sampler
        return f"{type(self).__name__}(brightness={s.brightness}, contrast={s.contrast}, saturation={s.saturation})"
