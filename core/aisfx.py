"""The aisfx sound-effects CNN (Ma & Lerch, ISMIR 2022) as an audio tower: its network, its mel front end, its weights.

PyPI's ``aisfx`` wheel ships the best model of the paper (X-Sequential-CE): a 4-block VGG-style CNN (DCASE's
Cnn_9layers, max pooling) trained across nine sound-effects libraries. Its embedding, what ``aisfx.inference`` returns,
is ``CrossNet.get_embedding`` = the CNN's output: per block of 100 spectrogram frames (~2.3 s), the conv maps meaned
over frequency and max-pooled over time, 512 values. The per-library classifier heads are not part of it.

Its inference input, reproduced here in torch inside the graph (``AisfxSpectrogram``), is the ISMIR paper's Essentia
path (``spectrogram_type='essentia'``, the package's default; its librosa path is a documented approximation):
audio at 44.1 kHz; Essentia's FrameCutter (2048-sample frames every 1024, the first centred on sample 0, zero-padded
past either end: ``ceil(L / 1024) + 1`` frames for L samples); a symmetric Hann window; |FFT|^2; MelBands (96 bands,
0-22050 Hz, HTK mel warping, triangles normalised to unit sum); ``log10(1e4 x + 1)``; then divided by 9.4578 (the
paper's maximum over all its training spectrograms, ``spec_norm='original'``); blocks of 100 frames, a short one
zero-padded (zeros are silence in this compressed scale: log10(1) = 0).

A clip is one block (102400 samples, 2.32 s: the audio of the block's frames), so ``clip_seconds`` of an aisfx tower
is that long. Longer files are cut by the runtime's windows (:func:`synergy.runtime.audio.window_spans`), which start
every 51200 samples, i.e. every 50 frames, as aisfx's blocks do (``emb_hop_size=0.5``); two differences remain: a
window's first frame sees zeros before the window where aisfx's sees the audio before it, and the runtime adds a
window aligned to the end where aisfx drops the partial block (most of the difference: a 4 s file has 3 windows
and 2 blocks). On 4-12 s files the file's embedding stays within cosine 0.995 of the mean of aisfx's blocks
(tests/runtime/test_parity_audio_families.py; 0.997 to 0.9997 measured).

The CNN is a transformers ``PreTrainedModel`` registered as model type "aisfx", so it travels like the other towers:
``save_pretrained`` folders, checkpoints that record its config, ``AutoModel.from_config``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from synergy.core.audio_frontend import spectrum_dtype

MODEL_TYPE = "aisfx"


class AisfxConfig(PreTrainedConfig):
    """The CNN and its front end. ``hidden_size``: channels of the last block (the embedding width); the blocks have
    hidden_size / 8, / 4, / 2, / 1."""

    model_type = MODEL_TYPE
    sample_rate: int = 44_100
    frame_length: int = 2048
    hop_length: int = 1024
    num_mel_bins: int = 96
    block_frames: int = 100  # aisfx's EMB_BLOCK_LENGTH: one embedding per 100 frames (2.32 s)
    spectrogram_max: float = 9.457798957824707  # aisfx's spec_norm='original' maximum (its minimum is 0)
    hidden_size: int = 512
    # {"weights", "source", "sha256", "licence", "text"}: core.pretrained_folders.weights_licence, into bundles
    weights_licence: dict | None = None


class ConvBlock(nn.Module):
    """Two 3x3 conv + BatchNorm + ReLU, then a max pool (aisfx's ``ConvBlock``; parameter names kept for its
    state dict)."""

    def __init__(self, in_channels: int, out_channels: int, pool: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool2d(x, kernel_size=self.pool)


class AisfxModel(PreTrainedModel):
    """log-mel blocks [B, frames, mels] (``AisfxSpectrogram``'s output) -> ``pooler_output`` [B, hidden_size]: the
    conv maps meaned over frequency, then max-pooled over time (aisfx's ``EmbeddingNet``)."""

    config: AisfxConfig
    config_class = AisfxConfig
    base_model_prefix = "aisfx"
    main_input_name = "input_values"
    # a CNN has no attention: whatever implementation the model's other towers use is fine here
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, config: AisfxConfig):
        super().__init__(config)
        width = config.hidden_size // 8
        self.conv_block1 = ConvBlock(1, width, pool=2)
        self.conv_block2 = ConvBlock(width, 2 * width, pool=2)
        self.conv_block3 = ConvBlock(2 * width, 4 * width, pool=2)
        self.conv_block4 = ConvBlock(4 * width, 8 * width, pool=1)
        self.post_init()

    def _init_weights(self, module):
        # aisfx's own init: Kaiming-uniform convs (leaky_relu gain), BatchNorm at identity
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, nonlinearity="leaky_relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)

    def forward(self, input_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        x = input_values[:, None]  # [B, 1, frames, mels]
        for block in (self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4):
            x = block(x)
        maps = x.mean(dim=3)  # [B, hidden, frames / 8]
        return BaseModelOutputWithPooling(last_hidden_state=maps, pooler_output=maps.amax(dim=2))


AutoConfig.register(MODEL_TYPE, AisfxConfig, exist_ok=True)
AutoModel.register(AisfxConfig, AisfxModel, exist_ok=True)


def htk_mel_filters(sample_rate: int, fft_length: int, n_mels: int) -> torch.Tensor:
    """Essentia's MelBands (TriangularBands: HTK mel warping, unit-sum triangles, 0 Hz to Nyquist), float64:
    [fft_length // 2 + 1, n_mels]. Bins j from ceil(lo / df) to floor(hi / df) inclusive, as Essentia iterates."""

    def mel(hertz):
        return 2595.0 * torch.log10(1.0 + hertz / 700.0)

    nyquist = torch.tensor(sample_rate / 2, dtype=torch.float64)
    mels = torch.linspace(0.0, mel(nyquist).item(), n_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)  # [n_mels + 2] Hz
    n_freq = fft_length // 2 + 1
    bin_step = (sample_rate / 2) / (n_freq - 1)
    bins = torch.arange(n_freq, dtype=torch.float64)
    bin_mel = mel(bins * bin_step)[:, None]  # [n_freq, 1]
    lo, centre, hi = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel - mel(lo)) / (mel(centre) - mel(lo))  # [n_freq, n_mels]
    falling = (mel(hi) - bin_mel) / (mel(hi) - mel(centre))
    weights = torch.where(bins[:, None] * bin_step < centre, rising, falling)
    inside = (bins[:, None] >= torch.ceil(lo / bin_step)) & (bins[:, None] <= torch.floor(hi / bin_step))
    weights = torch.where(inside, weights, 0.0)
    return weights / weights.sum(dim=0, keepdim=True)


def hann_dft_kernel(frame_length: int) -> torch.Tensor:
    """A frame's symmetric Hann window (Essentia's "hann") and real DFT as one matrix, float64:
    [2 * n_freq, frame_length], real parts then imaginary parts. (Essentia's zero-phase rotation of the frame
    changes only the phase, so the magnitudes need no rotation.)"""
    n = frame_length
    window = torch.hann_window(n, periodic=False, dtype=torch.float64)
    k = torch.arange(n // 2 + 1, dtype=torch.int64)[:, None]
    i = torch.arange(n, dtype=torch.int64)[None, :]
    angle = (k * i % n).to(torch.float64) * (2.0 * math.pi / n)  # exact angles before the float64 cos/sin
    return torch.cat([torch.cos(angle), -torch.sin(angle)]) * window


class AisfxSpectrogram(nn.Module):
    """Waveform [B, T] at 44.1 kHz + real samples per row [B] -> aisfx's normalised log-mel block
    [B, block_frames, n_mels]: the first block aisfx would cut from that clip (see the module docstring).

    A clip is read up to ``block_frames * hop_length`` samples (the samples of the block's frames; ``clip_seconds``
    of an aisfx tower is that long); samples past a row's length are zeroed, so a frame past Essentia's last one
    reads only zeros and gives exactly 0, the value aisfx pads a short block with. Framing, window and DFT are one
    strided ``conv1d`` (no STFT op in the graph), in float32 like the ONNX runtime (float64 on CUDA:
    :func:`synergy.core.audio_frontend.spectrum_dtype`); the matrices are buffers rebuilt from the arguments, never
    saved."""

    def __init__(
        self,
        sample_rate: int,
        frame_length: int,
        hop_length: int,
        n_mels: int,
        block_frames: int,
        spectrogram_max: float,
    ):
        super().__init__()
        self.hop_length, self.frame_length, self.spectrogram_max = hop_length, frame_length, float(spectrogram_max)
        self.n_freq = frame_length // 2 + 1
        self.num_samples = block_frames * hop_length
        # the first frame is centred on sample 0: frame k reads [k * hop - frame / 2, k * hop + frame / 2)
        self.left_pad = frame_length // 2
        self.right_pad = (block_frames - 1) * hop_length + frame_length - self.left_pad - self.num_samples
        kernel = hann_dft_kernel(frame_length).to(torch.float32)
        self.register_buffer("dft_kernel", kernel[:, None, :], persistent=False)  # [2 * n_freq, 1, frame_length]
        mel = htk_mel_filters(sample_rate, frame_length, n_mels).to(torch.float32)
        self.register_buffer("mel_filters", mel, persistent=False)  # [n_freq, n_mels]
        self.register_buffer("sample_index", torch.arange(self.num_samples), persistent=False)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            lengths = torch.full(waveform.shape[:1], waveform.shape[-1], dtype=torch.int64, device=waveform.device)
        # as the AST front end: no autocast, and float64 on CUDA, where float32 convolutions and matmuls run in TF32
        dtype = spectrum_dtype(waveform.device)
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            wave = F.pad(waveform.to(dtype), (0, self.num_samples))[:, : self.num_samples]  # [B, num_samples]
            wave = torch.where(self.sample_index < lengths.to(torch.int64)[:, None], wave, 0.0)
            wave = F.pad(wave, (self.left_pad, self.right_pad))
            kernel = self.dft_kernel.to(dtype)  # [2 * n_freq, 1, frame_length]
            spectrum = F.conv1d(wave[:, None, :], kernel, stride=self.hop_length)  # [B, 2 * n_freq, frames]
            real, imag = spectrum.split(self.n_freq, dim=1)
            power = (real.square() + imag.square()).transpose(1, 2)  # [B, frames, n_freq]
            bands = power @ self.mel_filters.to(dtype)  # [B, frames, n_mels]
            return (torch.log10(1e4 * bands + 1.0) / self.spectrogram_max).to(torch.float32)


def read_aisfx_checkpoint() -> dict[str, torch.Tensor]:
    """The installed aisfx wheel's ``checkpoint.pth`` (a pickled ``(state_dict, datasets)`` pair; sha256 checked
    first) -> the CNN's state dict, keys as :class:`AisfxModel` names them. ``weights_only=True``, and the only
    globals allowed are the numpy scalar and dtype types its dataset table (library -> (index, classes)) pickles."""
    import numpy
    from numpy._core import multiarray

    from synergy.core.pretrained_folders import AISFX, load_wheel_weights

    # the file pickles numpy 1.x's path to the scalar constructor; numpy 2 moved it to numpy._core
    allowed = [(multiarray.scalar, "numpy.core.multiarray.scalar"), numpy.dtype, numpy.dtypes.Int64DType]
    with torch.serialization.safe_globals(allowed):
        state, _datasets = load_wheel_weights(AISFX)
    prefix = "embedding_net."  # CrossNet's CNN; its fc.* classifier heads are not the embedding
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def extract_aisfx_folder(out) -> Path:
    """``out``: a ``save_pretrained`` folder of the aisfx CNN (config.json, model.safetensors, LICENSE) made from
    the installed ``aisfx`` wheel's checkpoint; ``model.audio.pretrained`` takes it. Its config carries the weights'
    provenance and licence (``weights_licence``), which checkpoints keep and bundles list under ``licences``."""
    from synergy.core.atomic_folder import atomic_folder
    from synergy.core.pretrained_folders import AISFX, weights_licence

    state = read_aisfx_checkpoint()  # first: a missing wheel is a FileNotFoundError that names the pip command
    licence = weights_licence(AISFX)
    model = AisfxModel(AisfxConfig(weights_licence=licence))
    model.load_state_dict(state, strict=True)  # every weight of the CNN, nothing else
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        (tmp / "LICENSE").write_text(licence["text"])
    return out
