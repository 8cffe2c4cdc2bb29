"""What an image tower's folder says (core/image_folder.py) and what the model builds from it: the family from
config.json, the preprocessing from the family's processor, the pooling; what cannot be run exactly is refused when
the model is built, with what to do."""

from __future__ import annotations

import json

import pytest
import torch

from synergy.core.checkpoint import load_checkpoint, save_checkpoint
from synergy.core.config import ConfigError
from synergy.core.image_folder import read_image_folder
from synergy.core.model import create_model
from synergy.core.tokenizer import train_tokenizer


def test_a_folder_without_preprocessor_config_gets_its_familys_defaults_at_the_towers_size(
    image_folder_writer, tmp_path
):
    """As CLIP folders always worked (a model saved without its processor): the family's processor defaults, sized
    to the tower (here 32 and 40 px, where the defaults say 224)."""
    for family, expected in [
        ("clip", ("clip", 32, "shortest_edge", 32, "bicubic", (0.48145466, 0.4578275, 0.40821073))),
        ("siglip", ("siglip", 40, "exact", 40, "bicubic", (0.5, 0.5, 0.5))),
        ("vit", ("vit", 24, "exact", 24, "bilinear", (0.5, 0.5, 0.5))),
    ]:
        folder = image_folder_writer(tmp_path / family, family)
        (folder / "preprocessor_config.json").unlink()
        says = read_image_folder(folder)
        assert (says.family, says.image_size, says.resize, says.resize_size, says.resample, says.mean) == expected
    folder = image_folder_writer(tmp_path / "dinov2", "dinov2")  # Bit's defaults are not DINOv2's: no guessing
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match=r"no preprocessor_config.json.*AutoImageProcessor.from_pretrained"):
        read_image_folder(folder)


def test_a_processor_that_does_not_fit_the_tower_is_refused(image_folder_writer, tmp_path):
    folder = image_folder_writer(tmp_path / "siglip", "siglip")
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "size": {"height": 48, "width": 48}}))
    with pytest.raises(ConfigError, match=r"processor gives 48 x 48 pixels but the tower takes 40 x 40"):
        create_model("tiny", **{"image.pretrained": str(folder)})


def test_an_unknown_model_type_names_the_supported_families(tmp_path, bert_folder_writer):
    folder = bert_folder_writer(tmp_path / "bert", pooling=None)
    with pytest.raises(ConfigError, match=r"model_type 'bert' is not an image tower family.*'dinov2'.*towers list"):
        create_model("tiny", **{"image.pretrained": str(folder)})


def test_a_processor_the_runtime_cannot_express_is_refused(image_folder_writer, tmp_path):
    folder = image_folder_writer(tmp_path / "vit", "vit")
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "size": {"height": 24, "width": 30}}))
    with pytest.raises(ConfigError, match=r"size .* is not supported \(a shortest edge, or square\)"):
        create_model("tiny", **{"image.pretrained": str(folder)})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"image.resize": "stretch"}, r"resize='stretch' \(choose shortest_edge or exact\)"),
        ({"image.resample": "cubic"}, r"resample='cubic' \(choose one of nearest, lanczos, bilinear"),
        ({"image.resize_size": 10}, r"resize_size=10 is below image_size=30"),
        ({"image.pooling": "mean"}, r"pooling='mean' \(choose pooler or cls"),
        ({"image.rescale_factor": 0.0}, r"rescale_factor=0.0 \(expected a number in \(0, 1\]"),
    ],
)
def test_config_values_the_runtime_cannot_apply_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        create_model("tiny", **override)


def test_a_checkpoint_keeps_the_family_preprocessing_and_pooling_without_the_folder(image_folder_writer, tmp_path):
    """A ViT folder without a pooler: the checkpoint rebuilds the tower without one (its state dict has none) and
    pools on the class token, from config.json alone."""
    folder = image_folder_writer(tmp_path / "vit", "vit-cls")
    torch.manual_seed(0)
    model = create_model("tiny", **{"image.pretrained": str(folder)}).eval()
    assert model.config.image.pooling == "cls" and model.image_tower.pooler is None
    tokenizer = train_tokenizer(["a red circle"] * 4, model.config.text.vocab_size, model.config.text.max_length)
    save_checkpoint(tmp_path / "checkpoint", model, tokenizer)
    for path in folder.iterdir():
        path.unlink()
    loaded, _ = load_checkpoint(tmp_path / "checkpoint")
    assert loaded.config.image == model.config.image and type(loaded.image_tower).__name__ == "ViTModel"
    pixels = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        hidden = loaded.image_tower(pixel_values=pixels).last_hidden_state
    assert torch.equal(loaded.image_features(pixels), hidden[:, 0])
