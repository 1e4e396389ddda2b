"""Image bytes -> uint8 CHW RGB tensor, whatever the file's format or extension; unreadable files are corrupt.

Public releases are not clean: ImageNet ships a PNG named ``.JPEG``, CMYK and grayscale JPEGs and
4-channel images. Every file is decoded from its bytes (the extension is ignored) with
``torchvision.io`` (libjpeg-turbo / libpng) into a ``uint8`` CHW RGB tensor; formats torchvision
cannot decode (BMP, TIFF, ...) fall back to Pillow. An empty (0-byte) file, or one neither can
decode, raises :class:`CorruptImageError`, whose message names the file and the fix
(``data.skip_corrupt``, applied by :class:`das_lab.data.datasets.ImageSampleDataset`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from das_lab.errors import UserError

_TORCHVISION_UNSUPPORTED = "Unsupported image file"
_FIX = "replace or delete the file, or set data.skip_corrupt=true to skip such files"


class CorruptImageError(UserError, RuntimeError):
    """An image file that no decoder can read; the message is one line naming the file.

    A DataLoader worker re-raises it with the worker's whole traceback as the message; only the
    traceback's last line, the original message, is kept.
    """

    def __init__(self, message: str) -> None:
        last_line = message.rstrip().rsplit("\n", 1)[-1]
        super().__init__(last_line.removeprefix(f"{__name__}.{type(self).__name__}: "))


def decode_rgb(data: bytes, path: str = "<bytes>") -> torch.Tensor:
    """Decode image bytes of any common format into a uint8 (3, H, W) RGB tensor."""
    if not data:
        raise CorruptImageError(f"{path}: empty file (0 bytes); {_FIX}")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        if _TORCHVISION_UNSUPPORTED not in str(error):
            raise CorruptImageError(f"{path}: cannot decode image ({error}); {_FIX}") from error
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except UnidentifiedImageError as error:
        raise CorruptImageError(
            f"{path}: cannot decode image (not a format torchvision or Pillow can read); {_FIX}"
        ) from error
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"{path}: cannot decode image ({error}); {_FIX}") from error
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def read_rgb(path: str | Path) -> torch.Tensor:
    """Read and decode one image file into a uint8 (3, H, W) RGB tensor."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CorruptImageError(f"{path}: cannot read file ({error})") from error
    return decode_rgb(data, str(path))
