"""Images in: decode (Pillow), convert to RGB, resize + center crop, normalise — the CLIP image processor's steps.

The steps are those of training's evaluation path (``train/data.py``): resize so the shortest edge is ``size``
(bicubic; the long edge rounded), center crop ``size`` x ``size``, /255, subtract the mean, divide by the std.
``transformers.CLIPImageProcessor`` floors the long edge instead of rounding: at most one pixel of difference
before the crop. EXIF orientation is not applied, as in training.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UnsupportedImage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def describe_image(source, index: int) -> str:
    """A short name for an input, used in error messages and results."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<image bytes #{index}, {len(source)} B>"
    if isinstance(source, np.ndarray):
        return f"<image array #{index}>"
    return f"<image #{index}>"


def load_image(source, *, name: str | None = None) -> Image.Image:
    """Decode one input to an RGB PIL image. ``source``: a path, the bytes of an image file, a PIL image, or a uint8
    array [H, W], [H, W, 3] or [H, W, 4]. Raises ``UnsupportedImage`` naming the input."""
    name = name or describe_image(source, 0)
    if isinstance(source, Image.Image):
        return _to_rgb(source, name)
    if isinstance(source, np.ndarray):
        channels_ok = source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (3, 4))
        if source.dtype != np.uint8 or not channels_ok:
            raise UnsupportedImage(
                name, f"array of shape {source.shape} and dtype {source.dtype}; pass uint8 [H, W, 3] (RGB) pixels"
            )
        if min(source.shape[:2]) == 0:
            raise UnsupportedImage(name, f"array of shape {source.shape} has no pixels")
        return Image.fromarray(source).convert("RGB")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise UnsupportedImage(name, "no such file; check the path")
        if path.is_dir():
            raise UnsupportedImage(name, "is a folder; pass image files (the CLI expands folders and globs)")
        opened = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UnsupportedImage(name, "empty bytes; pass the bytes of an image file (PNG, JPEG, WebP, ...)")
        opened = io.BytesIO(bytes(source))
    else:
        raise UnsupportedImage(
            name, f"unsupported input of type {type(source).__name__}; pass a path, bytes, a PIL image or a uint8 array"
        )
    try:
        with Image.open(opened) as image:
            image.load()  # decode now: a truncated file fails here, not later inside the batch
            return _to_rgb(image, name)
    except UnsupportedImage:
        raise
    except UnidentifiedImageError as error:
        problem = "not a recognised image format; pass a PNG, JPEG, WebP, BMP, GIF or TIFF"
        raise UnsupportedImage(name, problem) from error
    except Image.DecompressionBombError as error:
        raise UnsupportedImage(name, f"too many pixels to decode safely ({error}); downscale it first") from error
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise UnsupportedImage(name, f"cannot be decoded ({error}); the file is truncated or corrupt") from error


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if min(image.size) == 0:
        raise UnsupportedImage(name, f"image of size {image.size} has no pixels")
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess_image(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """RGB image -> pixel_values [3, size, size] float32: shortest edge to ``size`` (bicubic), center crop, /255,
    (x - mean) / std."""
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    pixels = np.asarray(image, dtype=np.float32)[top : top + size, left : left + size]  # [size, size, 3]
    pixels = (pixels / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # [3, size, size]
