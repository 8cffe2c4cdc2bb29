"""Model, presets, tower loading from local folders, checkpoint round trip. Tiny preset, odd sizes."""

import json

import pytest
import torch
from transformers import ASTConfig, ASTModel, CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel

from synergy.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from synergy.core.config import ConfigError, list_presets, load_config
from synergy.core.model import LOGIT_SCALE_INIT, create_model
from synergy.core.tokenizer import configure, train_tokenizer


def _batch(model, b=7, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return (
        torch.randn(b, 3, c.image.image_size, c.image.image_size, generator=g),
        torch.randint(4, c.text.vocab_size, (b, length), generator=g),
        torch.ones(b, length, dtype=torch.long),
        torch.randn(b, round(c.audio.clip_seconds * c.audio.sample_rate), generator=g) * 0.1,
    )


def _tokenizer(max_length=13):
    return train_tokenizer(["a red circle", "a blue square sound", "the green star"] * 3, 131, max_length)


def test_presets_listed_and_loadable():
    assert {"tiny", "small", "base", "large"} <= set(list_presets())
    base = load_config("base")
    assert (base.image.patch_size, base.text.width, base.audio.frequency_stride) == (16, 768, 12)
    large = load_config("large")
    assert (large.image.patch_size, large.image.width, large.audio.time_stride) == (14, 1024, 10)


def test_unknown_preset_and_key_list_the_valid_ones():
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        create_model("no-such-preset")
    with pytest.raises(ConfigError, match="valid keys: .*embed_dim"):
        create_model("tiny", embedding_size=3)
    with pytest.raises(ConfigError, match="valid keys: .*layers"):
        create_model("tiny", audio__depth=3)


def test_overrides_reach_the_towers():
    model = create_model("tiny", embed_dim=10, **{"audio.layers": 1})
    assert model.config.embed_dim == 10 and model.config.audio.layers == 1
    assert (
        len(model.audio_tower.encoder.layer if hasattr(model.audio_tower, "encoder") else model.audio_tower.layers) == 1
    )


def test_embeddings_shapes_and_normalised():
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    image, text, audio, scales = model(*_batch(model))
    for emb in (image, text, audio):
        assert emb.shape == (7, 24)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(scales, torch.full((3,), 1 / 0.07), atol=1e-4, rtol=1e-5)
    assert model.logit_scale.tolist() == pytest.approx([LOGIT_SCALE_INIT] * 3)


def test_logit_scales_clamped_at_100():
    model = create_model("tiny")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    torch.testing.assert_close(model.logit_scales(), torch.full((3,), 100.0))


def test_text_padding_does_not_change_embedding():
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    tokenizer = _tokenizer()
    short = tokenizer.encode_batch(["a red circle"])
    padded = tokenizer.encode_batch(["a red circle", "the green star sound and a blue square"])
    one = model.encode_text(torch.tensor([short[0].ids]), torch.tensor([short[0].attention_mask]))
    two = model.encode_text(torch.tensor([e.ids for e in padded]), torch.tensor([e.attention_mask for e in padded]))
    assert len(padded[0].ids) > len(short[0].ids)
    torch.testing.assert_close(one[0], two[0], atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    tokenizer = _tokenizer()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, {"step": 3, "optimizer": {"x": torch.ones(2)}})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_state",
    ]
    loaded, loaded_tokenizer = load_checkpoint(tmp_path / "ckpt")
    batch = _batch(model)
    for a, b in zip(model(*batch), loaded.eval()(*batch)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert loaded_tokenizer.encode("a red circle").ids == tokenizer.encode("a red circle").ids
    # no leftover temp folders from the atomic write
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_corrupt_or_incomplete_checkpoint_is_named(tmp_path):
    model = create_model("tiny")
    save_checkpoint(tmp_path / "ckpt", model, _tokenizer())
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint, missing tokenizer.json"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_checkpoint(tmp_path / "ckpt")


def test_towers_load_from_local_pretrained_folders(tmp_path):
    """Tiny random transformers models saved with save_pretrained, loaded through the real code path."""
    torch.manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=30,
            patch_size=6,
            hidden_size=36,
            num_hidden_layers=1,
            num_attention_heads=3,
            intermediate_size=37,
        )
    )
    text = RobertaModel(
        RobertaConfig(
            vocab_size=131,
            hidden_size=36,
            num_hidden_layers=1,
            num_attention_heads=3,
            intermediate_size=37,
            max_position_embeddings=20,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        add_pooling_layer=False,
    )
    audio = ASTModel(
        ASTConfig(
            hidden_size=36,
            num_hidden_layers=1,
            num_attention_heads=3,
            intermediate_size=37,
            patch_size=8,
            frequency_stride=8,
            time_stride=6,
            max_length=48,
            num_mel_bins=24,
        )
    )
    for name, module in (("vision", vision), ("text", text), ("audio", audio)):
        module.save_pretrained(tmp_path / name)
    configure(_tokenizer(), 13).save(str(tmp_path / "text" / "tokenizer.json"))
    model = create_model(
        "tiny",
        **{
            "image.pretrained": str(tmp_path / "vision"),
            "text.pretrained": str(tmp_path / "text"),
            "audio.pretrained": str(tmp_path / "audio"),
        },
    ).eval()
    for tower, original in ((model.image_tower, vision), (model.text_tower, text), (model.audio_tower, audio)):
        loaded_state = tower.state_dict()
        assert loaded_state.keys() == original.state_dict().keys()
        for key, value in original.state_dict().items():
            assert torch.equal(loaded_state[key], value), key
    # a checkpoint of a model with pretrained towers rebuilds without the folders
    save_checkpoint(tmp_path / "ckpt", model, _tokenizer())
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["towers"]["text"]["model_type"] == "roberta"
    # a pretrained AST pads as transformers' extractor does (log-mel 0), and the checkpoint records it
    assert model.config.audio.padding == config["synergy"]["audio"]["padding"] == "ast"
    for name in ("vision", "text", "audio"):
        for file in (tmp_path / name).iterdir():
            file.unlink()
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    batch = _batch(model)
    for a, b in zip(model(*batch), loaded.eval()(*batch)):
        torch.testing.assert_close(a, b)


def test_audio_padding_settles_by_tower_origin_and_checkpoints_keep_theirs(tmp_path):
    """Left open, a scratch tower pads with the log-mel of silence (issue 24); an explicit choice wins, and a
    checkpoint written when "ast" was the default for every tower loads with "ast" (it recorded it)."""
    scratch = create_model("tiny").eval()
    assert scratch.config.audio.padding == "silence"
    assert scratch.audio_frontend.padding == "silence"
    assert create_model("tiny", **{"audio.padding": "ast"}).audio_frontend.padding == "ast"
    with pytest.raises(ValueError, match="padding='zeros'"):
        create_model("tiny", **{"audio.padding": "zeros"})
    save_checkpoint(tmp_path / "ckpt", create_model("tiny", **{"audio.padding": "ast"}), _tokenizer())
    config_path = tmp_path / "ckpt" / "config.json"
    assert json.loads(config_path.read_text())["synergy"]["audio"]["padding"] == "ast"
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.audio_frontend.padding == "ast"
    # the two paddings give different embeddings for a short clip (the choice reaches the graph's input)
    wave = torch.randn(1, 4000) * 0.1
    lengths = torch.tensor([4000])
    torch.manual_seed(0)
    a = create_model("tiny", **{"audio.padding": "ast"}).eval()
    torch.manual_seed(0)
    b = create_model("tiny").eval()
    with torch.no_grad():
        assert not torch.allclose(a.encode_audio(wave, lengths), b.encode_audio(wave, lengths), atol=1e-4)


def test_missing_pretrained_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        create_model("tiny", **{"audio.pretrained": str(tmp_path / "nothing")})


def test_clip_seconds_and_num_frames_that_disagree_are_refused_with_the_consistent_values():
    import pytest

    from synergy.core.model import create_model

    with pytest.raises(ValueError, match=r"clip_seconds=5 gives 498 frames.*num_frames=1024; use clip_seconds=10.24"):
        create_model("tiny", **{"audio.clip_seconds": 5.0, "audio.num_frames": 1024})
    with pytest.raises(ValueError, match=r"clip_seconds=1 gives 98 frames.*num_frames=48.*or num_frames=98"):
        create_model("tiny", **{"audio.clip_seconds": 1.0})  # tiny has 48 frames: audio would be cropped away
    create_model("tiny", **{"audio.clip_seconds": 0.48})  # 46 real frames + 2 of padding: within 5%
