"""wav2vec2 / HuBERT towers (synergy.core.wav2vec2, synergy.core.audio_families): the normalisation equals
Wav2Vec2FeatureExtractor's, a clip pools the same alone or padded in a batch (GroupNorm first layer included), the
folder's feature extractor sets the rate, and a checkpoint rebuilds the tower without its folder.
End-to-end parity (file -> bundle -> runtime) is tests/runtime/test_parity_audio_families.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from synergy.core.model import create_model
from synergy.core.wav2vec2 import WaveformNormalizer, receptive_field, wav2vec2_features

SMALL = {
    "hidden_size": 36,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 37,
    "conv_dim": (17,) * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
}
LENGTHS = (400, 401, 1_333, 7_919)  # 400: wav2vec2's receptive field, the shortest clip with a frame


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("wav2vec2") / "folder"
    Wav2Vec2Model(Wav2Vec2Config(feat_extract_norm="group", **SMALL)).save_pretrained(out)
    Wav2Vec2FeatureExtractor(sampling_rate=16_000, do_normalize=True).save_pretrained(out)
    return out


def _waves(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n) + 0.3).astype(np.float32) for n in LENGTHS]  # a DC offset to remove


def _padded(waves) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.zeros(len(waves), max(w.size for w in waves))
    for row, wave in enumerate(waves):
        batch[row, : wave.size] = torch.from_numpy(wave)
    return batch, torch.tensor([w.size for w in waves])


def test_the_normalisation_is_the_feature_extractors_over_each_rows_real_samples():
    waves = _waves()
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    want = extractor(waves, sampling_rate=16_000, padding=True, return_tensors="np")["input_values"]
    batch, lengths = _padded(waves)
    got = WaveformNormalizer(normalize=True, min_samples=400)(batch, lengths).numpy()
    assert got.shape == (len(waves), batch.shape[1] + 399)  # room for one frame whatever the batch
    np.testing.assert_allclose(got[:, : want.shape[1]], want, atol=2e-5)  # zeros past each row, as the extractor
    assert (got[:, want.shape[1] :] == 0).all()
    raw = WaveformNormalizer(normalize=False, min_samples=400)(batch, lengths).numpy()
    np.testing.assert_array_equal(raw[:, : batch.shape[1]], batch.numpy())


def test_a_group_norm_tower_pools_each_clip_as_transformers_does_alone(folder):
    tower = Wav2Vec2Model.from_pretrained(folder).eval()
    assert receptive_field(tower.config.conv_kernel, tower.config.conv_stride) == 400
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    waves = _waves(1)
    batch, lengths = _padded(waves)
    with torch.no_grad():
        alone = [
            tower(extractor(w, sampling_rate=16_000, return_tensors="pt")["input_values"]).last_hidden_state.mean(1)
            for w in waves
        ]
        got = wav2vec2_features(tower, WaveformNormalizer(True, 400)(batch, lengths), lengths)
        # transformers' own padded batch of a GroupNorm model (no attention mask, as its docs say) is not the
        # clips alone: the norm's statistics take in the padding. Ours is.
        padded = extractor(waves, sampling_rate=16_000, padding=True, return_tensors="pt")["input_values"]
        theirs = tower(padded).last_hidden_state[0].mean(0)
    torch.testing.assert_close(got, torch.cat(alone), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(theirs, alone[0][0], atol=1e-3)


def test_the_folders_feature_extractor_sets_the_rate_and_a_checkpoint_keeps_it(folder, tmp_path):
    from synergy.core.checkpoint import load_checkpoint, save_checkpoint
    from synergy.core.tokenizer import train_tokenizer

    (tmp_path / "tower").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "tower" / name).write_bytes((folder / name).read_bytes())
    Wav2Vec2FeatureExtractor(sampling_rate=8_000, do_normalize=False).save_pretrained(tmp_path / "tower")
    model = create_model("tiny", **{"audio.pretrained": str(tmp_path / "tower")}).eval()
    assert (model.config.audio.sample_rate, model.config.audio.waveform_normalize) == (8_000, False)
    tokenizer = train_tokenizer(["a bell", "rain"] * 4, 131, model.config.text.max_length)
    saved = save_checkpoint(tmp_path / "checkpoint", model, tokenizer)
    assert json.loads((saved / "config.json").read_text())["synergy"]["audio"]["waveform_normalize"] is False
    loaded, _ = load_checkpoint(saved)
    batch, lengths = _padded(_waves(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_audio(batch, lengths), model.encode_audio(batch, lengths))


def test_folders_that_cannot_run_say_what_to_do(folder, tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no preprocessor_config\.json; save the model's feature extractor"):
        create_model("tiny", **{"audio.pretrained": str(tmp_path / "bare")})
    (tmp_path / "whisper").mkdir()
    (tmp_path / "whisper" / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(ValueError, match=r"model_type 'whisper' is not an audio family.*'aisfx'.*'wav2vec2'"):
        create_model("tiny", **{"audio.pretrained": str(tmp_path / "whisper")})


def test_the_intra_audio_contrast_is_refused_for_a_tower_without_a_log_mel(folder):
    from synergy.core.config import ConfigError
    from synergy.train.config import TrainConfig
    from synergy.train.loop import check_audio_intra

    model = create_model("tiny", **{"audio.pretrained": str(folder)})
    check_audio_intra(TrainConfig(data="x.csv"), model)
    with pytest.raises(ConfigError, match="this audio tower is wav2vec2; set audio_intra_weight=0"):
        check_audio_intra(TrainConfig(data="x.csv", audio_intra_weight=0.5), model)
    check_audio_intra(TrainConfig(data="x.csv", audio_intra_weight=0.5), create_model("tiny"))
