"""Audio tower families: which front end turns the waveform into a tower's input, and how its output is pooled.

A family is named by the tower's transformers ``model_type`` (a pretrained folder's config.json says it):

- "ast": AST over the kaldi log-mel (:mod:`synergy.core.audio_frontend`), pooled by its own pooler (CLS and
  distillation tokens);
- "wav2vec2": ``Wav2Vec2Model`` and ``HubertModel`` over the normalised waveform, mean-pooled over real frames
  (:mod:`synergy.core.wav2vec2`);
- "aisfx": the aisfx sound-effects CNN over its Essentia-style mel block (:mod:`synergy.core.aisfx`).

Every front end takes ``(waveform [B, T], waveform_lengths [B])`` and lives inside the model, so the exported audio
graph keeps the runtime's contract (a waveform at the model's rate plus real lengths) whatever the family.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import Tensor, nn

from synergy.core.aisfx import MODEL_TYPE as AISFX_MODEL_TYPE
from synergy.core.aisfx import AisfxConfig, AisfxSpectrogram
from synergy.core.config import AudioTowerConfig
from synergy.core.wav2vec2 import MODEL_TYPES as WAV2VEC2_MODEL_TYPES
from synergy.core.wav2vec2 import WaveformNormalizer, read_feature_extractor, receptive_field, wav2vec2_features

FAMILIES = {
    "audio-spectrogram-transformer": "ast",
    **dict.fromkeys(WAV2VEC2_MODEL_TYPES, "wav2vec2"),
    AISFX_MODEL_TYPE: "aisfx",
}


def family_of(model_type: str | None, where: str) -> str:
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not an audio family Synergy runs; supported model types: "
            f"{sorted(FAMILIES)} (`synergy towers list`)"
        )
    return family


def resolve_audio_folder(cfg: AudioTowerConfig) -> AudioTowerConfig:
    """``cfg`` with what its pretrained folder fixes: a wav2vec2 / HuBERT folder's sample rate and normalisation
    (its preprocessor_config.json; an explicit ``waveform_normalize`` wins), an aisfx folder's 44.1 kHz and one
    block as the clip. AST folders and towers from scratch keep the config's values."""
    folder = Path(cfg.pretrained).expanduser() if cfg.pretrained else None
    if folder is None or not (folder / "config.json").is_file():
        return cfg  # no folder: the tower builder's error says what a folder needs
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    family = family_of(model_type, f"audio tower {folder}/config.json")
    if family == "wav2vec2":
        rate, normalize = read_feature_extractor(folder)
        normalize = normalize if cfg.waveform_normalize is None else cfg.waveform_normalize
        return dataclasses.replace(cfg, sample_rate=rate, waveform_normalize=normalize)
    if family == "aisfx":
        tower = AisfxConfig.from_pretrained(folder)
        clip_seconds = tower.block_frames * tower.hop_length / tower.sample_rate
        return dataclasses.replace(cfg, sample_rate=tower.sample_rate, clip_seconds=clip_seconds)
    return cfg


def waveform_frontend(cfg: AudioTowerConfig, tower: nn.Module) -> nn.Module:
    """The front end of a wav2vec2 / HuBERT or aisfx tower (AST's is the model's ``LogMelFrontend``)."""
    config = tower.config
    family = family_of(config.model_type, "audio tower")
    if family == "wav2vec2":
        if cfg.waveform_normalize is None:
            raise ValueError("audio.waveform_normalize must be set for a wav2vec2 / HuBERT tower built from a config")
        return WaveformNormalizer(cfg.waveform_normalize, receptive_field(config.conv_kernel, config.conv_stride))
    if family == "aisfx":
        block_samples = config.block_frames * config.hop_length
        if cfg.sample_rate != config.sample_rate or round(cfg.clip_seconds * cfg.sample_rate) != block_samples:
            raise ValueError(
                f"audio: the aisfx tower reads {config.sample_rate} Hz clips of {block_samples} samples but the config "
                f"says sample_rate={cfg.sample_rate}, clip_seconds={cfg.clip_seconds:g}; use sample_rate="
                f"{config.sample_rate}, clip_seconds={block_samples / config.sample_rate!r}"
            )
        return AisfxSpectrogram(
            config.sample_rate,
            config.frame_length,
            config.hop_length,
            config.num_mel_bins,
            config.block_frames,
            config.spectrogram_max,
        )
    raise ValueError(f"audio tower family {family!r} has no waveform front end here; AST uses LogMelFrontend")


def pooled_audio_features(family: str, tower: nn.Module, features: Tensor, lengths: Tensor | None) -> Tensor:
    """A tower's pooled output [B, hidden] from its front end's ``features`` and the rows' real samples [B]."""
    if family == "wav2vec2":
        return wav2vec2_features(tower, features, lengths)
    return tower(input_values=features).pooler_output  # AST: its pooler; aisfx: mean over mels, max over time
