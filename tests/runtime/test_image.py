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


# each family's processor at its real size (the export parity tests run tiny towers at tiny sizes): the folder's
# processor settings as core/image_folder.py reads them, then our pixels against transformers' on odd images
REAL_PROCESSORS = {
    "siglip": ("Siglip", {"size": {"height": 224, "width": 224}}),
    "vit": ("ViT", {"size": {"height": 224, "width": 224}, "do_convert_rgb": True}),
    "dinov2": (
        "Bit",
        {
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "image_mean": (0.485, 0.456, 0.406),
            "image_std": (0.229, 0.224, 0.225),
        },
    ),
    "efficientnet-lite0": ("Bit", None),  # the preprocessor_config.json that `synergy towers efficientnet-lite0` writes
}


ODD_IMAGES = [(37, 91, "RGB"), (300, 200, "RGBA"), (640, 481, "L"), (1000, 250, "RGB"), (224, 224, "RGB")]


@pytest.mark.parametrize("family", list(REAL_PROCESSORS))
def test_each_familys_preprocessing_is_its_processors_at_real_sizes(family, tmp_path, image_processor):
    from synergy.core.efficientnet_lite import PREPROCESSING
    from synergy.core.image_folder import read_image_folder
    from synergy.runtime.image import preprocess_with
    from synergy.runtime.manifest import ImagePreprocessing

    name, settings = REAL_PROCESSORS[family]
    if settings is None:
        settings = {k: v for k, v in PREPROCESSING.items() if k != "image_processor_type"}
    processor = image_processor(name)(**settings)
    processor.save_pretrained(tmp_path)
    model_type = {"efficientnet-lite0": "synergy-efficientnet-lite0"}.get(family, family)
    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}", "image_size": 224}}')
    says = read_image_folder(tmp_path)
    spec = ImagePreprocessing(
        says.image_size, says.mean, says.std, says.resize, says.resize_size, says.resample, says.rescale_factor
    )
    for seed, (width, height, mode) in enumerate(ODD_IMAGES):
        image = picture(width, height, seed=seed).convert(mode)
        if mode == "RGBA":  # a real alpha gradient: composited onto white by both
            image.putalpha(Image.fromarray((np.arange(width)[None, :] * np.ones((height, 1)) % 256).astype(np.uint8)))
        ours = preprocess_with(load_image(image), spec)
        theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 224, 224)
        np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=f"{family} {width}x{height} {mode}")


def test_training_evaluates_images_with_the_towers_own_preprocessing(tmp_path):
    """One source of truth: a model config with SigLIP-like preprocessing (exact resize, bilinear, 0.5) gives the
    training set's evaluation pixels the runtime's, not CLIP's shortest edge and crop."""
    from synergy.core.config import load_config
    from synergy.runtime.image import preprocess_with
    from synergy.train.data import ManifestDataset, read_manifest

    path = tmp_path / "x.png"
    picture(70, 45, seed=2).save(path)
    (tmp_path / "m.csv").write_text("img_path,wav_path,label,caption\nx.png,,dog,\n")
    overrides = {"image.resize": "exact", "image.resample": "bilinear", "image.mean": [0.5] * 3, "image.std": [0.5] * 3}
    config = load_config("tiny", **overrides)
    dataset = ManifestDataset.for_model(read_manifest(tmp_path / "m.csv"), config)
    ours = preprocess_with(load_image(path), config.image.preprocessing())
    np.testing.assert_array_equal(dataset[0]["image"], ours)
    clip = preprocess_image(load_image(path), config.image.image_size, (0.5,) * 3, (0.5,) * 3)
    assert np.abs(clip - ours).max() > 0.1  # the CLIP path would differ: the test can fail
