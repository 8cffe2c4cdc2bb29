"""Missing-modality reconstruction (MMR) heads: from two present modalities' frozen-tower features, the third.

After Synergy-CLIP's MMR: the two present modalities' pooled tower outputs (before the projections) are each mapped
by a bias-free linear layer and summed, a residual bottleneck MLP refines the sum, and a linear layer feeds the
decoder of the missing modality:

- image: a linear map to a coarse grid, then up-sampling blocks (conv -> PixelShuffle x2 -> GroupNorm -> GELU ->
  CBAM attention) to the model's own image size, sigmoid -> pixels in [0, 1];
- audio: the same blocks on a non-square grid to the model's log-mel geometry [frames, mels], in the z-scored
  units of the model's audio front end;
- text: non-autoregressive, every position of the tokenizer's ``max_length`` predicted at once by a small
  transformer encoder over learned position embeddings, then a linear layer to the tokenizer's vocabulary.

Departures from the published heads, and why: each input gets a LayerNorm first (the towers' pooled outputs differ
in scale by an order of magnitude); the spatial MLP after CBAM is left out (at 64 px it is an all-to-all layer that
costs more than the whole decoder on CPU, and the convolutions already mix neighbourhoods); a grid that does not
divide by 2^n (a 30 px image, 98 frames) is up-sampled to the next multiple and resized to the exact size.

The encoders are not part of these modules: callers pass features computed by the frozen model.
:func:`ssim` and :func:`reconstruction_loss` are the loss ops (the loss is its own op, as for the contrastive model).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGETS = ("image", "audio", "text")


def present_modalities(target: str) -> tuple[str, str]:
    """The two modalities a ``target`` is reconstructed from: image <- (text, audio), audio <- (image, text),
    text <- (image, audio)."""
    if target not in TARGETS:
        raise ValueError(f"unknown reconstruction target {target!r}; choose one of {', '.join(TARGETS)}")
    return tuple(m for m in ("image", "text", "audio") if m != target)  # type: ignore[return-value]


@dataclass(frozen=True)
class ReconstructionConfig:
    """One head. Sizes come from the checkpoint (:func:`reconstruction_config`); only the builder reads this."""

    target: str
    input_widths: tuple[int, int]  # pooled widths of the two present towers, in present_modalities(target) order
    output_shape: tuple[int, ...]  # image (3, S, S) | audio (frames, mels) | text (max_length,)
    vocab_size: int = 0  # text only: the tokenizer's vocabulary
    fusion_width: int = 256
    bottleneck: int = 128
    decoder_channels: int = 64  # channels on the coarsest grid, halved (down to 16) per up-sampling block
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ReconstructionConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"reconstruction head config: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        data = dict(data)
        data["input_widths"] = tuple(data["input_widths"])
        data["output_shape"] = tuple(data["output_shape"])
        return cls(**data)


def reconstruction_config(model, target: str, vocab_size: int, **overrides) -> ReconstructionConfig:
    """A head sized from a loaded :class:`~synergy.core.model.SynergyModel`: the towers' pooled widths, the model's
    image size, log-mel geometry and text length; ``vocab_size`` is the tokenizer's (``get_vocab_size()``)."""
    widths = {
        "image": model.image_projection.in_features,
        "text": model.text_projection.in_features,
        "audio": model.audio_projection.in_features,
    }
    config = model.config
    shapes = {
        "image": (3, config.image.image_size, config.image.image_size),
        "audio": (config.audio.num_frames, config.audio.n_mels),
        "text": (config.text.max_length,),
    }
    present = present_modalities(target)
    return ReconstructionConfig(
        target=target,
        input_widths=(widths[present[0]], widths[present[1]]),
        output_shape=shapes[target],
        vocab_size=vocab_size if target == "text" else 0,
        **overrides,
    )


# ------------------------------------------------------------------------------------------------------ the modules


class Fusion(nn.Module):
    """Two pooled features -> one vector: LayerNorm + bias-free linear each, summed, a residual bottleneck MLP
    (LayerNorm -> Linear to ``bottleneck`` -> GELU -> Linear back), then a linear layer to ``out_width``."""

    def __init__(self, input_widths: tuple[int, int], width: int, bottleneck: int, out_width: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in input_widths)
        self.inputs = nn.ModuleList(nn.Linear(w, width, bias=False) for w in input_widths)
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, bottleneck), nn.GELU(), nn.Linear(bottleneck, width)
        )
        self.out = nn.Linear(width, out_width)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """a: [B, wa], b: [B, wb] -> [B, out_width]."""
        x = self.inputs[0](self.norms[0](a)) + self.inputs[1](self.norms[1](b))  # [B, width]
        return self.out(x + self.mlp(x))


class CBAM(nn.Module):
    """Convolutional block attention: channel attention (shared MLP over average- and max-pooled channels), then
    spatial attention (7x7 conv over the channel mean and max)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.channel_mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        pooled = self.channel_mlp(x.mean((2, 3), keepdim=True)) + self.channel_mlp(x.amax((2, 3), keepdim=True))
        x = x * torch.sigmoid(pooled)
        summary = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)  # [B, 2, H, W]
        return x * torch.sigmoid(self.spatial(summary))


class UpBlock(nn.Module):
    """[B, c_in, h, w] -> [B, c_out, 2h, 2w]: conv to 4 c_out channels, PixelShuffle x2, GroupNorm, GELU, CBAM."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, c_out), c_out)
        self.attention = CBAM(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(F.gelu(self.norm(F.pixel_shuffle(self.conv(x), 2))))


def grid_plan(height: int, width: int, coarsest: int = 4) -> tuple[int, int, int]:
    """-> (up-sampling blocks n, start height, start width): the fewest blocks whose coarse grid has its shorter side
    <= ``coarsest``; start * 2^n >= the output (resized down to it when larger)."""
    blocks = max(0, math.ceil(math.log2(min(height, width) / coarsest)))
    return blocks, math.ceil(height / 2**blocks), math.ceil(width / 2**blocks)


class GridDecoder(nn.Module):
    """[B, in_width] -> [B, out_channels, height, width] through a coarse grid, :class:`UpBlock` s, and a sub-pixel
    head (conv to 4 x out_channels, PixelShuffle x2) for the last doubling: a full-resolution block would cost more
    than all the others together on CPU."""

    def __init__(self, in_width: int, out_channels: int, height: int, width: int, channels: int):
        super().__init__()
        self.size = (height, width)
        doublings, self.start_h, self.start_w = grid_plan(height, width)
        widths = [max(16, channels >> i) for i in range(max(1, doublings))]
        self.channels = widths[0]
        self.project = nn.Linear(in_width, widths[0] * self.start_h * self.start_w)
        self.blocks = nn.Sequential(*(UpBlock(c_in, c_out) for c_in, c_out in itertools.pairwise(widths)))
        self.scale = 2 if doublings else 1
        self.head = nn.Conv2d(widths[-1], out_channels * self.scale**2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        grid = self.project(x).view(x.shape[0], self.channels, self.start_h, self.start_w)
        out = F.pixel_shuffle(self.head(self.blocks(grid)), self.scale)  # [B, out_channels, start * 2^n]
        if tuple(out.shape[-2:]) != self.size:  # a static size: resized in every export runtime
            out = F.interpolate(out, size=self.size, mode="bilinear", align_corners=False)
        return out


class TextDecoder(nn.Module):
    """[B, width] -> logits [B, length, vocab]: every position at once (non-autoregressive), a transformer encoder
    over learned position embeddings plus the fused vector."""

    def __init__(self, width: int, length: int, vocab_size: int, layers: int, heads: int):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )  # no dropout: a resumed run repeats an uninterrupted one exactly
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.vocab = nn.Linear(width, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.encoder(self.positions[None] + x[:, None, :])  # [B, L, width]
        return self.vocab(self.norm(hidden))


class Reconstructor(nn.Module):
    """One target's head: :class:`Fusion` + its decoder. ``forward(a, b)`` with the present modalities' pooled
    features in :func:`present_modalities` order -> image [B, 3, S, S] in [0, 1] | log-mel [B, frames, mels] (the
    front end's z-scored units) | text logits [B, max_length, vocab]."""

    def __init__(self, config: ReconstructionConfig):
        super().__init__()
        self.target = config.target
        c = config
        if c.target == "text":
            self.fusion = Fusion(c.input_widths, c.fusion_width, c.bottleneck, c.text_width)
            self.decoder = TextDecoder(c.text_width, c.output_shape[0], c.vocab_size, c.text_layers, c.text_heads)
        else:
            channels, height, width = (1, *c.output_shape) if c.target == "audio" else c.output_shape
            self.fusion = Fusion(c.input_widths, c.fusion_width, c.bottleneck, c.fusion_width)
            self.decoder = GridDecoder(c.fusion_width, channels, height, width, c.decoder_channels)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        out = self.decoder(self.fusion(a, b))
        if self.target == "image":
            return torch.sigmoid(out)
        if self.target == "audio":
            return out[:, 0]  # [B, frames, mels]
        return out


def build_reconstructor(config: ReconstructionConfig) -> Reconstructor:
    return Reconstructor(config)


# ----------------------------------------------------------------------------------------------------- the losses

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def _gaussian(size: int, sigma: float, device, dtype) -> Tensor:
    x = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def ssim(x: Tensor, y: Tensor, data_range: float, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Structural similarity per item, Wang et al. 2004 as scikit-image computes it with ``gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False``: an 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, the map
    averaged over the positions where the window fits (valid convolution = scikit-image's cropped border) and over
    channels. ``data_range``: max - min of the values the data can take (1.0 for pixels in [0, 1]; for z-scored
    log-mels, their range over the training targets, never 1.0 by default).

    x, y: [B, C, H, W] (or [B, H, W] for one channel), H and W >= ``window`` -> [B]."""
    if x.ndim == 3:
        x, y = x[:, None], y[:, None]
    channels = x.shape[1]
    g = _gaussian(window, sigma, x.device, x.dtype)
    kernel_h = g.view(1, 1, window, 1).expand(channels, 1, window, 1)
    kernel_w = g.view(1, 1, 1, window).expand(channels, 1, 1, window)

    def blur(t: Tensor) -> Tensor:  # separable Gaussian, valid positions only, each channel on its own
        return F.conv2d(F.conv2d(t, kernel_h, groups=channels), kernel_w, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def reconstruction_loss(
    target: str, prediction: Tensor, truth: Tensor, token_mask: Tensor | None = None, audio_range: float = 1.0
) -> Tensor:
    """Synergy-CLIP's losses with its two mistakes fixed. Image: 0.75 (1 - SSIM at range 1) + 0.25 (MSE + L1) on
    pixels in [0, 1]. Audio: 0.75 (1 - SSIM at ``audio_range``, the training log-mels' range) + 0.25 MSE. Text:
    cross-entropy over real tokens only (``token_mask`` [B, L], 1 where the truth has a token; padding is not a
    target). -> scalar, the mean over the batch."""
    if target == "image":
        ssim_term = 1 - ssim(prediction, truth, 1.0).mean()
        return 0.75 * ssim_term + 0.25 * (F.mse_loss(prediction, truth) + F.l1_loss(prediction, truth))
    if target == "audio":
        return 0.75 * (1 - ssim(prediction, truth, audio_range).mean()) + 0.25 * F.mse_loss(prediction, truth)
    per_token = F.cross_entropy(prediction.transpose(1, 2), truth, reduction="none")  # [B, L]
    mask = token_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)
