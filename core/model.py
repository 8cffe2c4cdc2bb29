"""SynergyModel: three towers, a linear projection each, L2-normalised embeddings, three learnable logit scales.

The model returns embeddings; the loss is its own op (``synergy.kernels.contrastive``), so export and runtime use
the towers without it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synergy.core.audio_families import family_of, pooled_audio_features, resolve_audio_folder, waveform_frontend
from synergy.core.audio_frontend import LogMelFrontend, check_clip_geometry
from synergy.core.config import ConfigError, SynergyConfig, load_config
from synergy.core.image_folder import IMAGE_POOLINGS, RESAMPLE_NAMES, read_image_folder
from synergy.core.text_folder import POOLINGS, read_text_folder
from synergy.core.towers import build_audio_tower, build_image_tower, build_text_tower

PAIRS = ("image_text", "text_audio", "audio_image")
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


class SynergyModel(nn.Module):
    def __init__(self, config: SynergyConfig, hf_configs: dict | None = None):
        """``hf_configs``: the towers' transformers configs (from a checkpoint) to rebuild them without the
        pretrained folders; None builds from ``config`` (from scratch or from the local pretrained folders)."""
        super().__init__()
        hf = hf_configs or {}
        config = _resolve_text(config, from_folder="text" not in hf)
        config = _resolve_image(config, from_folder="image" not in hf)
        if "audio" not in hf:  # a pretrained audio folder's rate and front-end settings (core.audio_families)
            config = dataclasses.replace(config, audio=resolve_audio_folder(config.audio))
        config = _resolve_audio(config)
        # with the text pooling and length, the image preprocessing and the audio padding actually used, so that
        # checkpoints record them
        self.config = config
        # towers training locked (LiT, synergy.train.locked_features): {tower: unlocked last layers}; checkpoints
        # record it, so a resume can check that it locks the same way
        self.locked: dict[str, int] = {}
        attn = config.attn_implementation
        self.image_tower, image_width = build_image_tower(config.image, attn, hf.get("image"))
        self.text_tower, text_width = build_text_tower(config.text, attn, hf.get("text"))
        self.audio_tower, audio_width = build_audio_tower(config.audio, attn, hf.get("audio"))
        self.audio_family = family_of(self.audio_tower.config.model_type, "audio tower")
        a = config.audio
        if self.audio_family == "ast":
            check_clip_geometry(a.sample_rate, a.clip_seconds, a.num_frames)
            self.audio_frontend = LogMelFrontend(a.sample_rate, a.n_mels, a.num_frames, a.mean, a.std, a.padding)
        else:  # wav2vec2 / HuBERT's normalisation or aisfx's mel block
            self.audio_frontend = waveform_frontend(a, self.audio_tower)
        self.image_projection = nn.Linear(image_width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(text_width, config.embed_dim, bias=False)
        self.audio_projection = nn.Linear(audio_width, config.embed_dim, bias=False)
        # one learnable temperature per pair (image-text, text-audio, audio-image), stored as log-scale
        self.logit_scale = nn.Parameter(torch.full((3,), LOGIT_SCALE_INIT))
        for projection in (self.image_projection, self.text_projection, self.audio_projection):
            nn.init.normal_(projection.weight, std=projection.in_features**-0.5)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: [B, 3, H, W] normalised -> [B, D] L2-normalised."""
        return F.normalize(self.image_projection(self.image_features(pixel_values)), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: [B, L] int64 -> [B, D], pooled as ``config.text.pooling`` says."""
        return F.normalize(self.text_projection(self.text_features(input_ids, attention_mask)), dim=-1)

    def encode_audio(self, waveform: Tensor, waveform_lengths: Tensor | None = None, augment=None) -> Tensor:
        """waveform: [B, T] mono at ``config.audio.sample_rate``, rows zero-padded; waveform_lengths: [B] int64 real
        samples per row (None: every row is T long) -> [B, D]. A clip gives the same embedding alone or padded.
        ``augment``: a ``core.spec_augment.SpecAugment`` applied to the log-mel (training's intra-audio contrast)."""
        features = self.audio_frontend(waveform, waveform_lengths)  # [B, frames, mels], float32 (quiet bins need it)
        if augment is not None and self.audio_family != "ast":
            raise ValueError(f"SpecAugment (audio_intra_weight) needs AST's log-mel; this tower is {self.audio_family}")
        if augment is not None:
            frames = None
            if waveform_lengths is not None:
                frames = (self.audio_frontend.frame_ends[None, :] <= waveform_lengths[:, None]).sum(-1)  # [B]
            features = augment(features, frames)
        if waveform_lengths is None:  # explicit, so that a locked tower's cache sees one input per row
            waveform_lengths = torch.full(waveform.shape[:1], waveform.shape[-1], device=waveform.device)
        return F.normalize(self.audio_projection(self.audio_features(features, waveform_lengths)), dim=-1)

    # The towers' pooled outputs before the projections: what missing-modality reconstruction
    # (synergy.core.reconstruction) fuses, and the one place each tower's pooling is written.

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: [B, 3, H, W] normalised -> pooled [B, image width]: the tower's pooler_output (CLIP's
        post-LayerNorm class token, SigLIP's attention-pool head, ...) or, with ``config.image.pooling`` "cls", the
        final state of the class token (a ViT without a trained pooler)."""
        output = self.image_tower(pixel_values=pixel_values)
        return output.last_hidden_state[:, 0] if self.config.image.pooling == "cls" else output.pooler_output

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: [B, L] -> pooled [B, text width]: the final state of the first token (CLS,
        <s>), or the mean of the final states over the attention mask (sentence-transformers' mean pooling)."""
        hidden = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
        if self.config.text.pooling != "mean":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        # the clamp is sentence-transformers' own: an all-padding row gives zeros, not NaN
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def audio_features(self, log_mel: Tensor, lengths: Tensor | None = None) -> Tensor:
        """log_mel: ``audio_frontend``'s output (AST: the normalised log-mel [B, frames, mels]; wav2vec2 / HuBERT:
        the normalised waveform [B, T']; aisfx: its mel block); lengths: [B] real samples per row (None: all) ->
        pooled [B, audio width], as the family pools (:func:`synergy.core.audio_families.pooled_audio_features`)."""
        log_mel = log_mel.to(self.audio_projection.weight.dtype)  # a half-precision tower gets half features
        return pooled_audio_features(self.audio_family, self.audio_tower, log_mel, lengths)

    def logit_scales(self) -> Tensor:
        """[3] exp'd scales for (image-text, text-audio, audio-image), clamped at 100 as in CLIP."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        waveform: Tensor,
        waveform_lengths: Tensor | None = None,
    ):
        """One training batch -> ``(image, text, audio, logit_scales)``: [B, D] x 3 and [3]. The scales come out of
        forward so that DDP sees every parameter used inside its forward."""
        return (
            self.encode_image(pixel_values),
            self.encode_text(input_ids, attention_mask),
            self.encode_audio(waveform, waveform_lengths),
            self.logit_scales(),
        )


def _resolve_text(config: SynergyConfig, from_folder: bool) -> SynergyConfig:
    """``config`` with its text pooling (and, for a tower read from a pretrained folder, its max length) settled:
    the folder's own when the config leaves them open (:mod:`synergy.core.text_folder`)."""
    text = config.text
    pooling, max_length = text.pooling, text.max_length
    # (a folder without config.json is left to the tower builder, whose error says what such a folder needs)
    if from_folder and text.pretrained and (Path(text.pretrained).expanduser() / "config.json").is_file():
        folder = read_text_folder(Path(text.pretrained).expanduser())
        pooling, max_length = pooling or folder.pooling, folder.max_length
    pooling = pooling or "cls"
    if pooling not in POOLINGS:
        raise ConfigError(f"text.pooling={pooling!r}: choose one of {', '.join(POOLINGS)} (or null: the folder's own)")
    return dataclasses.replace(config, text=dataclasses.replace(text, pooling=pooling, max_length=max_length))


def _resolve_audio(config: SynergyConfig) -> SynergyConfig:
    """``config`` with its audio padding settled when left open: AST's own log-mel 0 for a pretrained tower (exact
    parity with transformers' pipeline), the log-mel of silence for a tower trained from scratch. Log-0 padding is
    loud broadband noise after AST's normalisation; on short clips (spoken words in a 1 s clip) a scratch tower
    trained with it reached 66.0% on unseen speakers (5 seeds) against 73.8% with silence (3 seeds;
    benchmarks/results/unseen-voices.json). Checkpoints written before this record "ast" and keep it."""
    audio = config.audio
    padding = audio.padding or ("ast" if audio.pretrained else "silence")
    return dataclasses.replace(config, audio=dataclasses.replace(audio, padding=padding))


def _resolve_image(config: SynergyConfig, from_folder: bool) -> SynergyConfig:
    """``config`` with its image preprocessing and pooling settled: for a tower read from a pretrained folder, the
    folder's own (:mod:`synergy.core.image_folder`; its processor's preprocessing always, its pooling unless the
    config names one); values checked against what the runtime can apply."""
    image = config.image
    if from_folder and image.pretrained and (Path(image.pretrained).expanduser() / "config.json").is_file():
        try:
            folder = read_image_folder(Path(image.pretrained).expanduser())
        except ValueError as error:
            raise ConfigError(f"image.pretrained: {error}") from None
        image = dataclasses.replace(
            image,
            image_size=folder.image_size,
            mean=folder.mean,
            std=folder.std,
            resize=folder.resize,
            resize_size=folder.resize_size,
            resample=folder.resample,
            rescale_factor=folder.rescale_factor,
            pooling=image.pooling or folder.pooling,
        )
    image = dataclasses.replace(
        image, pooling=image.pooling or "pooler", resize_size=image.resize_size or image.image_size
    )
    problems = []
    if image.pooling not in IMAGE_POOLINGS:
        problems.append(f"pooling={image.pooling!r} (choose {' or '.join(IMAGE_POOLINGS)}, or null: the folder's own)")
    if image.resize not in ("shortest_edge", "exact"):
        problems.append(f"resize={image.resize!r} (choose shortest_edge or exact)")
    if image.resample not in RESAMPLE_NAMES.values():
        problems.append(f"resample={image.resample!r} (choose one of {', '.join(RESAMPLE_NAMES.values())})")
    if image.resize_size < image.image_size:
        problems.append(f"resize_size={image.resize_size} is below image_size={image.image_size} (nothing to crop)")
    if not 0 < image.rescale_factor <= 1:
        problems.append(f"rescale_factor={image.rescale_factor!r} (expected a number in (0, 1], 1/255 for 8-bit)")
    if problems:
        raise ConfigError("image: " + "; ".join(problems))
    return dataclasses.replace(config, image=image)


def create_model(preset_or_config: str | SynergyConfig = "small", **overrides) -> SynergyModel:
    """``create_model("small", embed_dim=256, audio__layers=2)``; unknown presets or keys raise with the valid ones."""
    return SynergyModel(load_config(preset_or_config, **overrides))
