"""Images in: decode (Pillow), convert to RGB, resize + center crop, normalise — the CLIP image processor's steps.

The same steps as ``transformers.CLIPImageProcessor`` (tested against it): transparency is composited onto white,
the shortest edge is resized to ``size`` (bicubic, the long edge floored), center crop ``size`` x ``size``, /255,
subtract the mean, divide by the std. EXIF orientation is not applied, as transformers does not. Training and
evaluation call these functions too (training swaps the resize + center crop for its random resized crop).
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
        return _to_rgb(Image.fromarray(source), name)
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
    """Any mode -> RGB; transparency (an alpha band, or a palette/greyscale transparency key) is composited onto
    white, as transformers' ``convert_to_rgb`` does (a plain ``convert("RGB")`` would show what lies under it)."""
    if min(image.size) == 0:
        raise UnsupportedImage(name, f"image of size {image.size} has no pixels")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    """Shortest edge to ``size`` (bicubic), the long edge ``int(size * long / short)`` as transformers computes it."""
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), Image.Resampling.BICUBIC)


def normalise_pixels(image: Image.Image, mean, std) -> np.ndarray:
    """RGB image [H, W] -> [3, H, W] float32: /255, (x - mean) / std."""
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # [H, W, 3]
    pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def preprocess_image(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """RGB image -> pixel_values [3, size, size] float32: shortest edge to ``size``, center crop, normalise."""
    image = resize_shortest_edge(image, size)
    width, height = image.size
    top, left = (height - size) // 2, (width - size) // 2
    return normalise_pixels(image.crop((left, top, left + size, top + size)), mean, std)
