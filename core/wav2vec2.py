"""wav2vec2 and HuBERT audio towers: their feature extractor's normalisation in the graph, padding-blind pooling.

Their processor, transformers' ``Wav2Vec2FeatureExtractor``, takes the raw waveform at the model's rate (16 kHz) and,
when ``do_normalize``, gives each clip zero mean and unit variance over its own samples:
``(x - mean) / sqrt(var + 1e-7)``, padding set to 0 (``WaveformNormalizer``, over each row's real length from the
graph's ``waveform_lengths``). The tower's pooled output is the mean of ``last_hidden_state`` over the clip's real
frames, counted with the conv feature encoder's length formula (``_get_feat_extract_output_lengths``).

A clip gives the same vector alone or in a padded batch: the encoder gets the frame mask (transformers zeroes the
padded frames before its positional convolution and masks them in attention), and the first conv layer of the
"group"-norm models (wav2vec2-base, hubert-base: a GroupNorm per channel over *all* frames) is normalised over the
real frames only (:func:`masked_channel_norm`). transformers itself, for those models, is told not to take an
attention mask, so its padded batches differ from the clips alone; Synergy's answer is the clip alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPES = ("wav2vec2", "hubert")
NORMALIZE_EPSILON = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm's


def read_feature_extractor(folder: Path) -> tuple[int, bool]:
    """A wav2vec2 / HuBERT folder's ``preprocessor_config.json`` -> (sampling_rate, do_normalize)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"audio tower: {folder} has no preprocessor_config.json; save the model's feature extractor into the same "
            "folder (Wav2Vec2FeatureExtractor.from_pretrained(NAME).save_pretrained(DIR)): it says the sample rate "
            "and whether clips are normalised"
        )
    data = json.loads(path.read_text())
    kind = data.get("feature_extractor_type", "Wav2Vec2FeatureExtractor")
    if kind != "Wav2Vec2FeatureExtractor":
        raise ValueError(f"audio tower: {path} describes a {kind}; wav2vec2 and HuBERT use Wav2Vec2FeatureExtractor")
    return int(data.get("sampling_rate", 16_000)), bool(data.get("do_normalize", True))


def receptive_field(kernels, strides) -> int:
    """Samples the conv feature encoder reads for its first frame: fewer give no frame at all."""
    field, step = 1, 1
    for kernel, stride in zip(kernels, strides):
        field += (kernel - 1) * step
        step *= stride
    return field


class WaveformNormalizer(nn.Module):
    """Waveform [B, T] (rows zero-padded) + real samples [B] -> [B, T + min_samples - 1]: each row normalised over
    its real samples when ``normalize`` (Wav2Vec2FeatureExtractor's ``do_normalize``), zero past them. The zeros
    appended (min_samples - 1) give every row at least one encoder frame without a shape-dependent branch; the
    frames they add are masked like any padding."""

    def __init__(self, normalize: bool, min_samples: int):
        super().__init__()
        self.normalize, self.extra = normalize, min_samples - 1

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            lengths = torch.full(waveform.shape[:1], waveform.shape[-1], dtype=torch.int64, device=waveform.device)
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            wave = F.pad(waveform.float(), (0, self.extra))  # [B, T']
            index = torch.arange(wave.shape[-1], device=wave.device)
            is_sample = index < lengths.to(torch.int64)[:, None]  # [B, T']
            wave = torch.where(is_sample, wave, 0.0)
            if not self.normalize:
                return wave
            count = lengths.clamp(min=1).to(wave.dtype)[:, None]  # [B, 1]
            mean = wave.sum(dim=-1, keepdim=True) / count
            variance = torch.where(is_sample, wave - mean, 0.0).square().sum(dim=-1, keepdim=True) / count
            return torch.where(is_sample, (wave - mean) / torch.sqrt(variance + NORMALIZE_EPSILON), 0.0)


def masked_channel_norm(x: torch.Tensor, frames: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm`` (a GroupNorm with one group per channel) over each row's first ``frames`` frames only.
    x: [B, C, T]; frames: [B] -> [B, C, T] (frames past a row's count hold values that nothing reads)."""
    mask = (torch.arange(x.shape[-1], device=x.device) < frames[:, None])[:, None, :].to(x.dtype)  # [B, 1, T]
    count = frames.clamp(min=1).to(x.dtype)[:, None, None]
    mean = (x * mask).sum(dim=-1, keepdim=True) / count  # [B, C, 1]
    variance = ((x - mean) * mask).square().sum(dim=-1, keepdim=True) / count
    x = (x - mean) / torch.sqrt(variance + norm.eps)
    return x * norm.weight[None, :, None] + norm.bias[None, :, None]


def wav2vec2_features(tower: nn.Module, values: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """A ``Wav2Vec2Model`` / ``HubertModel`` on ``WaveformNormalizer``'s output [B, T'] with each row's real samples
    [B] (None: every row is T' long) -> the mean of ``last_hidden_state`` over the real frames [B, hidden].

    The steps of the models' own ``forward`` (feature encoder, feature projection, SpecAugment in training, encoder
    with the frame mask), with the first layer's GroupNorm over real frames only (module docstring)."""
    if lengths is None:
        lengths = torch.full(values.shape[:1], values.shape[-1], dtype=torch.int64, device=values.device)
    config = tower.config
    x, frames = values[:, None], lengths  # [B, 1, T'], [B]
    for layer, kernel, stride in zip(tower.feature_extractor.conv_layers, config.conv_kernel, config.conv_stride):
        frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1  # the layer's real output frames
        if isinstance(getattr(layer, "layer_norm", None), nn.GroupNorm):
            x = layer.activation(masked_channel_norm(layer.conv(x), frames, layer.layer_norm))
        else:
            x = layer(x)
    frames = frames.clamp(min=0)  # = tower._get_feat_extract_output_lengths(lengths)
    is_frame = torch.arange(x.shape[-1], device=x.device) < frames[:, None]  # [B, frames]
    hidden = tower.feature_projection(x.transpose(1, 2))
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # wav2vec2 also returns the normed features
    hidden = tower._mask_hidden_states(hidden)  # SpecAugment on the features, in training only (as the models do)
    last = tower.encoder(hidden, attention_mask=is_frame).last_hidden_state  # [B, frames, hidden]
    weights = is_frame[:, :, None].to(last.dtype)
    return (last * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
