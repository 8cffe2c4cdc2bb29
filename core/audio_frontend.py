"""Waveform -> normalised kaldi log-mel fbank, the input of the AST audio tower, written so that it exports.

It reproduces transformers' ``ASTFeatureExtractor`` (kaldi fbank: 25 ms frames every 10 ms, snip-edges framing,
per-frame DC removal, pre-emphasis 0.97, symmetric Hann window, |DFT|^2 zero-padded to a power of two, kaldi mel
bank from 20 Hz to Nyquist, natural log with a float32-epsilon floor; zero-pad or crop to ``num_frames`` after the
log; then ``(x - mean) / (2 * std)``), so pretrained AST checkpoints see the features they were trained on.

Each row carries its real number of samples (``lengths``): batches are zero-padded to one length, but a row's
frames past its own samples are padding in the log domain (0 before normalisation), exactly where the extractor,
run on that clip alone, pads; so a clip gets the same features alone or in a padded batch.

Framing, DC removal, pre-emphasis, window and the real DFT are all linear in the samples of a frame, so they are
folded into one matrix applied by one strided ``conv1d``: no STFT/FFT op (ONNX and TensorRT support for those is
patchy) and no Python branch on the input length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from synergy.runtime.audio import count_frames, kaldi_frame_sizes

PREEMPHASIS = 0.97
LOW_FREQUENCY_HZ = 20.0
# float32 machine epsilon: kaldi's (and the extractor's) floor before the log
MEL_FLOOR = 1.192092955078125e-07
# what a frame past a row's real samples holds in the log domain, by ``padding``: "ast" is 0, as AST's extractor pads
# (pretrained towers need it); "silence" is what a silent frame gives (the floor), so a short clip padded to the
# tower's frames reads as the clip followed by silence, with no edge where the real samples end
PADDING_LOG_MEL = {"ast": 0.0, "silence": math.log(MEL_FLOOR)}


def kaldi_mel_filters(sample_rate: int, fft_length: int, n_mels: int) -> torch.Tensor:
    """Kaldi mel filter bank, triangles drawn in mel space, float64: [fft_length // 2 + 1, n_mels]."""

    def hertz_to_mel(hertz: torch.Tensor) -> torch.Tensor:
        return 1127.0 * torch.log1p(hertz / 700.0)

    edges = torch.linspace(
        hertz_to_mel(torch.tensor(LOW_FREQUENCY_HZ, dtype=torch.float64)).item(),
        hertz_to_mel(torch.tensor(sample_rate / 2, dtype=torch.float64)).item(),
        n_mels + 2,
        dtype=torch.float64,
    )  # [n_mels + 2]: left edge, n_mels centres, right edge
    bin_hertz = torch.arange(fft_length // 2 + 1, dtype=torch.float64) * (sample_rate / fft_length)
    bin_mel = hertz_to_mel(bin_hertz)[:, None]  # [n_freq, 1]
    rising = (bin_mel - edges[:-2]) / (edges[1:-1] - edges[:-2])  # [n_freq, n_mels]
    falling = (edges[2:] - bin_mel) / (edges[2:] - edges[1:-1])
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def folded_dft_kernel(frame_length: int, fft_length: int) -> torch.Tensor:
    """One frame's DC removal, pre-emphasis, Hann window and real DFT as one matrix, float64.

    Returns [2 * n_freq, frame_length] with n_freq = fft_length // 2 + 1: rows [0, n_freq) give the real parts,
    rows [n_freq, 2 * n_freq) the imaginary parts of ``rfft(window * preemph(frame - mean(frame)), fft_length)``.
    """
    n = frame_length
    identity = torch.eye(n, dtype=torch.float64)
    remove_dc = identity - 1.0 / n  # frame - mean(frame)
    # y[i] = x[i] - 0.97 x[i-1]; kaldi's edge rule for the first sample: y[0] = x[0] - 0.97 x[0] (the symmetric
    # Hann window zeroes sample 0, so the rule cannot change the output; kept so the fold reads as kaldi does)
    preemphasis = identity - PREEMPHASIS * torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)
    preemphasis[0, 0] = 1.0 - PREEMPHASIS
    window = torch.hann_window(n, periodic=False, dtype=torch.float64)  # kaldi "hanning": 0.5 - 0.5 cos(2 pi i/(n-1))
    # zero-padding the frame to fft_length only adds zero columns, so the DFT matrix keeps n columns;
    # (k * i) mod fft_length keeps the angles exact before the float64 cos/sin
    k = torch.arange(fft_length // 2 + 1, dtype=torch.int64)[:, None]
    i = torch.arange(n, dtype=torch.int64)[None, :]
    angle = (k * i % fft_length).to(torch.float64) * (2.0 * math.pi / fft_length)  # [n_freq, n]
    dft = torch.cat([torch.cos(angle), -torch.sin(angle)])  # [2 * n_freq, n]
    return dft @ (window[:, None] * preemphasis @ remove_dc)


class LogMelFrontend(nn.Module):
    """Waveform [B, T] (mono, float, at ``sample_rate``) -> normalised log-mel features [B, num_frames, n_mels].

    Equal to ``ASTFeatureExtractor(sampling_rate, num_mel_bins=n_mels, max_length=num_frames, mean, std)`` up to
    float32 rounding (see tests/core/test_audio_frontend.py for the measured tolerance). Frame sizes follow kaldi
    (25 ms / 10 ms); the extractor's numpy path hard-codes 400 / 160 / 512, so the two agree at 16 kHz only.

    Clips shorter than ``num_frames`` frames are padded in the log domain, with 0 (``padding="ast"``, as AST does)
    or with the log-mel of silence (``padding="silence"``, for towers trained from scratch), and longer ones are
    cropped; a clip shorter than one frame (length < ``frame_length``, including 0) gives all padding (the
    runtime and the data loader refuse such clips before they get here).

    The folded DFT kernel and the mel matrix are non-persistent buffers: rebuilt from the arguments in
    ``__init__``, they follow ``.to(device)`` but stay out of ``state_dict`` (checkpoints hold learned weights only)
    and out of ``parameters()`` (no optimiser, weight decay or DDP gradient sync touches them). A frozen Parameter
    would be saved in every checkpoint and counted as model weights. Keep the module in float32: casting the whole
    model with ``.half()`` rounds these buffers too, and the power spectrum needs float32 to resolve quiet bins.
    """

    def __init__(
        self,
        sample_rate: int = 16_000,
        n_mels: int = 128,
        num_frames: int = 1024,
        mean: float = -4.2677393,
        std: float = 4.5689974,
        padding: str = "ast",
    ):
        super().__init__()
        if padding not in PADDING_LOG_MEL:
            raise ValueError(f"padding={padding!r}: choose {' or '.join(PADDING_LOG_MEL)}")
        if sample_rate < 200:
            raise ValueError(f"sample_rate={sample_rate} Hz gives frames under 5 samples; expected >= 200 Hz")
        if n_mels < 1 or num_frames < 1:
            raise ValueError(f"n_mels={n_mels} and num_frames={num_frames} must both be >= 1")
        if not std > 0:
            raise ValueError(f"std={std} must be > 0 (it divides the features)")
        self.sample_rate, self.n_mels, self.num_frames = sample_rate, n_mels, num_frames
        self.mean, self.std = float(mean), float(std)
        # a padding frame's log-mel, and the same after normalisation: what SpecAugment masks with
        self.padding, self.padding_log_mel = padding, PADDING_LOG_MEL[padding]
        self.padding_value = (self.padding_log_mel - self.mean) / (2.0 * self.std)
        self.frame_length, self.hop_length, self.fft_length = kaldi_frame_sizes(sample_rate)
        self.n_freq = self.fft_length // 2 + 1
        # samples read by the first num_frames frames: the waveform is padded/cropped to exactly this many
        self.num_samples = (num_frames - 1) * self.hop_length + self.frame_length

        # fold in float64, round once to float32
        kernel = folded_dft_kernel(self.frame_length, self.fft_length).to(torch.float32)
        self.register_buffer("dft_kernel", kernel[:, None, :], persistent=False)  # [2 * n_freq, 1, frame_length]
        mel = kaldi_mel_filters(sample_rate, self.fft_length, n_mels).to(torch.float32)
        self.register_buffer("mel_filters", mel, persistent=False)  # [n_freq, n_mels]
        frame_ends = torch.arange(num_frames) * self.hop_length + self.frame_length
        self.register_buffer("frame_ends", frame_ends, persistent=False)  # [num_frames] int64
        self.register_buffer("sample_index", torch.arange(self.num_samples), persistent=False)  # [num_samples]

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """waveform: [B, T] float, zero-padded rows; lengths: [B] int64 real samples per row (None: all T)
        -> [B, num_frames, n_mels] float32."""
        if lengths is None:
            lengths = torch.full(waveform.shape[:1], waveform.shape[-1], dtype=torch.int64, device=waveform.device)
        lengths = lengths.to(torch.int64).clamp(max=self.num_samples)[:, None]  # [B, 1]
        # autocast would run the conv in bf16/fp16 and bury quiet bins under rounding noise: autocast off, and the
        # spectrum in spectrum_dtype (float32 on CPU and in export, float64 on CUDA: no TF32 there)
        dtype = spectrum_dtype(waveform.device)
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            wave = waveform.to(dtype)
            # pad then crop to exactly the samples num_frames frames read: the frame count is static, short clips
            # (even T < frame_length) never under-run the conv, and long clips cost no more than a full one
            wave = F.pad(wave, (0, self.num_samples))[:, : self.num_samples]  # [B, num_samples]
            is_sample = self.sample_index < lengths  # [B, num_samples]
            # per-frame DC removal makes the output blind to a constant offset in exact arithmetic, but in float32
            # a large offset leaks through the rounded kernel (x100 error on a quiet tone riding 0.9 DC): remove
            # the clip's mean (over its real samples only) first, which keeps that leak at the level of the
            # signal's own rounding
            wave = torch.where(is_sample, wave, 0.0)
            mean = wave.sum(dim=-1, keepdim=True) / lengths.clamp(min=1).to(dtype)
            wave = torch.where(is_sample, wave - mean, 0.0)
            kernel, mel_filters = self.dft_kernel.to(dtype), self.mel_filters.to(dtype)  # no-ops in float32
            spectrum = F.conv1d(wave[:, None, :], kernel, stride=self.hop_length)  # [B, 2 * n_freq, frames]
            real, imag = spectrum.split(self.n_freq, dim=1)
            power = (real.square() + imag.square()).transpose(1, 2)  # [B, num_frames, n_freq]
            log_mel = torch.log(torch.clamp(power @ mel_filters, min=MEL_FLOOR)).to(torch.float32)  # [B, frames, mels]
            # kaldi snip-edges: a frame that runs past the row's real samples is not a frame; AST pads the log-mel
            # with 0 there (frames past the end of the tensor would read zeros instead: the same rule covers them)
            is_real_frame = self.frame_ends <= lengths  # [B, num_frames]
            log_mel = torch.where(is_real_frame[:, :, None], log_mel, self.padding_log_mel)
            return (log_mel - self.mean) / (2.0 * self.std)


def spectrum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the front end's DFT convolution and mel matmul on ``device``.

    On CUDA, cuDNN runs float32 convolutions in TF32 by default (Ampere and newer) and matmuls follow
    ``set_float32_matmul_precision``: 10 mantissa bits would move quiet bins between GPU training and the float32
    ONNX runtime. float64 has no TF32 mode, so CUDA runs these two ops in float64 and the result matches the float32
    CPU path to float32 rounding, whatever the process's TF32 settings, without touching them: switching the global
    flags inside a forward changed them for every other thread, and on torch >= 2.9 reading the legacy
    ``allow_tf32`` flags raises once anything in the process used the ``fp32_precision`` API. The cost is small
    beside the towers (one conv and one matmul per clip), on GPUs with slow float64 too. CPU and export (traced on
    CPU) keep float32, the arithmetic of the runtime's graph."""
    return torch.float64 if device.type == "cuda" else torch.float32


def check_clip_geometry(sample_rate: int, clip_seconds: float, num_frames: int) -> None:
    """A clip must fill the tower's frames: none cropped (audio silently dropped from every window) and at most 5%
    padding (AST's own AudioSet setting, 10 s in 1024 frames, pads 2.5%). Raises ``ValueError`` with the
    consistent values."""
    clip_samples = round(clip_seconds * sample_rate)
    frames = count_frames(clip_samples, sample_rate)
    hop = kaldi_frame_sizes(sample_rate)[1]
    if frames > num_frames or num_frames - frames > max(3, 0.05 * num_frames):
        consistent_seconds = num_frames * hop / sample_rate
        consistent_frames = count_frames(round(consistent_seconds * sample_rate), sample_rate)
        raise ValueError(
            f"audio clip_seconds={clip_seconds:g} gives {frames} frames at {sample_rate} Hz but num_frames="
            f"{num_frames}; use clip_seconds={consistent_seconds:g} for {num_frames} frames "
            f"({consistent_frames} real), or num_frames={max(1, frames)} for {clip_seconds:g} s clips"
        )
