"""Images in: decode (Pillow), convert to RGB, resize + center crop, normalise — the tower family's image processor.

The steps of transformers' image processors (tested against each: CLIP, SigLIP, ViT, and Bit's for DINOv2 and
EfficientNet-Lite0), as the bundle manifest's ``ImagePreprocessing`` says them: transparency is composited onto
white; the image is resized, either its shortest edge to ``resize_size`` (the long edge floored: CLIP, DINOv2) or to
exactly ``resize_size`` x ``resize_size`` (SigLIP, ViT), with the Pillow filter ``resample``; a center crop of
``size`` x ``size`` (a no-op after an exact resize to ``size``); x ``rescale_factor``; minus the mean, over the std.
EXIF orientation is not applied, as transformers does not. Training and evaluation call these functions too (training
swaps the resize + center crop for its random resized crop).

Where this differs from transformers, on purpose:

- High-bit-depth greyscale (Pillow modes ``I;16*`` and ``I``, what 16-bit PNG and TIFF files open as) is scaled from
  0..65535 to 0..255 (``round(v / 257)``); float images (``F``) are read as 0..1. Transformers converts them with
  Pillow's ``convert``, which clips every value above 255: a 16-bit photo becomes almost all white.
- Work and memory are bounded by the output size. When the resized image would be over ``MAX_RESIZE_AREA`` times
  the crop (a shortest-edge resize of an aspect ratio beyond 32:1; below it an image is at most 7168 x 224 pixels
  before a 224 crop), only the part that survives the center crop is resampled (Pillow's ``resize(box=...)``: the
  filter still reads across the crop's edges; pixels agree with resize-then-crop to a few levels, not exactly,
  Pillow's rounding differs). A 100000 x 1 PNG (370 bytes) would otherwise be resized to 6,400,000 x 64 pixels
  (7.5 GiB as float). An exact resize is bounded by its own output (``resize_size`` squared). Ordinary images take
  transformers' exact path.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UnsupportedImage
from .files import open_input
from .manifest import ImagePreprocessing

MAX_RESIZE_AREA = 32  # resized area / crop area above which only the crop is resampled (aspect > 32:1)
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
        return _to_rgb(Image.fromarray(source), name)
    if isinstance(source, (str, os.PathLike)):
        opened = open_input(Path(source), name, "image", UnsupportedImage)
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
    """Any mode -> RGB; transparency (an alpha band, or a palette/greyscale transparency key) is composited onto
    white, as transformers' ``convert_to_rgb`` does (a plain ``convert("RGB")`` would show what lies under it)."""
    if min(image.size) == 0:
        raise UnsupportedImage(name, f"image of size {image.size} has no pixels")
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_l(image, name)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise UnsupportedImage(name, f"Pillow mode {image.mode} cannot be converted to RGB ({error})") from error


def _high_depth_to_l(image: Image.Image, name: str) -> Image.Image:
    """16-bit or 32-bit integer greyscale (0..65535) or float greyscale (0..1) -> 8-bit ``L``, scaled rather than
    clipped; a transparency key becomes an alpha band (``LA``)."""
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise UnsupportedImage(name, "float image with NaN or Inf pixels; the file is corrupt")
        grey = np.rint(np.clip(values, 0.0, 1.0) * 255.0)
    else:
        grey = np.rint(np.clip(values.astype(np.float64), 0, 65535) / 257.0)
    result = Image.fromarray(grey.astype(np.uint8), "L")
    key = image.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        result = Image.merge("LA", (result, Image.fromarray(alpha, "L")))
    return result


RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resized_size(width: int, height: int, spec: ImagePreprocessing) -> tuple[int, int]:
    """(width, height) after ``spec``'s resize: the shortest edge to ``resize_size`` with the long edge
    ``int(side * long / short)`` as transformers computes it, or exactly ``resize_size`` square."""
    side = spec.resize_size
    if spec.resize == "exact":
        return side, side
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def normalise_pixels(image: Image.Image, mean, std, rescale_factor: float = 1 / 255) -> np.ndarray:
    """RGB image [H, W] -> [3, H, W] float32: x ``rescale_factor``, (x - mean) / std."""
    pixels = np.asarray(image, dtype=np.float32) * np.float32(rescale_factor)  # [H, W, 3]
    pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def preprocess_image(image: Image.Image, size: int, mean, std, **options) -> np.ndarray:
    """RGB image -> pixel_values [3, size, size] float32. ``options``: the other fields of ``ImagePreprocessing``
    (resize, resize_size, resample, rescale_factor); without them, CLIP's processor."""
    return preprocess_with(image, ImagePreprocessing(size, tuple(mean), tuple(std), **options))


def preprocess_with(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """RGB image -> pixel_values [3, size, size] float32: resize, center crop, rescale, normalise, as ``spec`` (a
    bundle manifest's, or a model config's ``ImageTowerConfig.preprocessing()``) says.

    When the resize would be over ``MAX_RESIZE_AREA`` crops, the crop is taken in the source's coordinates and only
    it is resampled (see the module docstring): the resized size and crop offsets are transformers', mapped back by
    the resize's scale per axis."""
    size, resample = spec.size, RESAMPLE[spec.resample]
    width, height = image.size
    new_width, new_height = resized_size(width, height, spec)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    if new_width * new_height <= MAX_RESIZE_AREA * size * size:
        unchanged = (new_width, new_height) == (width, height)
        resized = image if unchanged else image.resize((new_width, new_height), resample)
        cropped = resized.crop((left, top, left + size, top + size))
    else:
        scale_x, scale_y = width / new_width, height / new_height
        box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
        cropped = image.resize((size, size), resample, box=box)
    return normalise_pixels(cropped, spec.mean, spec.std, spec.rescale_factor)
