"""Image decoding and preprocessing: the same pixels as training's evaluation path; bad images fail by name."""

import io

import numpy as np
import pytest
from PIL import Image

from synergy.runtime.errors import UnsupportedImage
from synergy.runtime.image import load_image, preprocess_image

from .conftest import IMAGE_SIZE, MEAN, STD, picture


@pytest.mark.parametrize(("width", "height"), [(37, 37), (70, 45), (45, 129), (20, 31), (129, 36)])
def test_preprocess_matches_training_eval_path(width, height, tmp_path):
    from synergy.train.data import ManifestDataset, read_manifest

    path = tmp_path / "x.png"
    picture(width, height, seed=width).save(path)
    (tmp_path / "m.csv").write_text("img_path,wav_path,label,caption\nx.png,,dog,\n")
    dataset = ManifestDataset(
        read_manifest(tmp_path / "m.csv"),
        image_size=IMAGE_SIZE,
        mean=MEAN,
        std=STD,
        sample_rate=8000,
        clip_seconds=0.5,
        text_mode="prompt",
        templates=("{}",),
    )
    ours = preprocess_image(load_image(path), IMAGE_SIZE, MEAN, STD)
    theirs = dataset[0]["image"]  # evaluation: no augmentation seed
    assert ours.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def test_modes_and_sources_become_rgb(tmp_path):
    rgb = picture(40, 50)
    path = tmp_path / "a.png"
    rgb.save(path)
    as_array = np.asarray(rgb)
    for source in (path, str(path), path.read_bytes(), rgb, as_array, rgb.convert("RGBA"), rgb.convert("P")):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (40, 50)
    gray = load_image(np.asarray(rgb.convert("L")))
    assert gray.mode == "RGB"


def _raises(source, match):
    with pytest.raises(UnsupportedImage, match=match) as info:
        load_image(source)
    return info.value


def test_missing_file_and_folder(tmp_path):
    error = _raises(tmp_path / "gone.png", "no such file")
    assert error.source == str(tmp_path / "gone.png")
    _raises(tmp_path, "is a folder")


def test_undecodable_bytes_and_files(tmp_path):
    _raises(b"", "empty bytes")
    _raises(b"GIF89a but not really", "cannot be decoded|not a recognised image")
    _raises(b"plain text", "not a recognised image format; pass a PNG")
    path = tmp_path / "fake.jpg"
    path.write_text("not a jpeg")
    assert "fake.jpg" in str(_raises(path, "not a recognised image format"))


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_truncated_image(format, tmp_path):
    buffer = io.BytesIO()
    picture(64, 64).save(buffer, format=format)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{format.lower()}"
    path.write_bytes(data[: len(data) // 2])
    _raises(path, "truncated or corrupt")


def test_bad_arrays_and_types():
    _raises(np.zeros((8, 8, 3), np.float32), "pass uint8")
    _raises(np.zeros((8, 8, 2), np.uint8), "pass uint8")
    _raises(np.zeros((0, 8, 3), np.uint8), "no pixels")
    _raises(3.14, "unsupported input of type float")
    assert load_image(Image.new("RGB", (3, 2))).size == (3, 2)
