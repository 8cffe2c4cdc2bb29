"""A reconstructed log-mel -> a waveform you can listen to, in numpy: the mel pseudo-inverse + Griffin-Lim.

The log-mel is the model's own feature (kaldi fbank, :mod:`synergy.core.audio_frontend`): undo its normalisation
and log, map the mel energies back to a linear power spectrum with the pseudo-inverse of the same kaldi mel bank
(negative energies clipped), take the magnitude, undo the pre-emphasis's tilt, and find a phase by Griffin-Lim
(Griffin & Lim 1984: alternate projections between the STFT of a signal and the target magnitude) on the front end's
frames (25 ms every 10 ms, FFT of the next power of two). Written in numpy because no well-kept library fits here:
torchaudio is not used (see README), and librosa would add numba and a dozen packages for one function.
"""

from __future__ import annotations

import numpy as np

from synergy.core.audio_frontend import PREEMPHASIS, kaldi_mel_filters
from synergy.runtime.audio import kaldi_frame_sizes


def _stft(wave: np.ndarray, window: np.ndarray, hop: int, fft: int, frames: int) -> np.ndarray:
    """-> [frames, fft // 2 + 1] complex; frame t reads wave[t * hop : t * hop + len(window)]."""
    length = len(window)
    wave = np.pad(wave, (0, max(0, (frames - 1) * hop + length - len(wave))))
    index = np.arange(length)[None, :] + hop * np.arange(frames)[:, None]
    return np.fft.rfft(wave[index] * window, n=fft, axis=-1)


def _istft(spectrum: np.ndarray, window: np.ndarray, hop: int, length_out: int) -> np.ndarray:
    """Weighted overlap-add inverse of :func:`_stft` (least squares for the given window)."""
    length = len(window)
    frames = np.fft.irfft(spectrum, axis=-1)[:, :length] * window
    out = np.zeros(length_out)
    norm = np.zeros(length_out)
    for t, frame in enumerate(frames):
        out[t * hop : t * hop + length] += frame
        norm[t * hop : t * hop + length] += window**2
    return out / np.maximum(norm, 1e-8)


def log_mel_to_waveform(
    log_mel: np.ndarray, sample_rate: int, mean: float, std: float, iterations: int = 48, seed: int = 0
) -> np.ndarray:
    """log_mel: [frames, mels] in the front end's z-scored units -> waveform [samples] float32, peak 0.9."""
    frame_length, hop, fft = kaldi_frame_sizes(sample_rate)
    frames, n_mels = log_mel.shape
    mel_energy = np.exp(log_mel.astype(np.float64) * (2.0 * std) + mean)  # [frames, mels]
    filters = kaldi_mel_filters(sample_rate, fft, n_mels).numpy()  # [n_freq, mels]
    power = np.clip(mel_energy @ np.linalg.pinv(filters), 0.0, None)  # [frames, n_freq]
    frequency = np.arange(fft // 2 + 1) / fft * 2 * np.pi
    tilt = np.abs(1 - PREEMPHASIS * np.exp(-1j * frequency))  # the pre-emphasis filter's gain per bin
    magnitude = np.sqrt(power) / np.maximum(tilt, 1e-3)
    window = np.hanning(frame_length + 2)[1:-1]
    samples = (frames - 1) * hop + frame_length
    rng = np.random.default_rng(seed)
    spectrum = magnitude * np.exp(2j * np.pi * rng.random(magnitude.shape))
    for _ in range(iterations):
        wave = _istft(spectrum, window, hop, samples)
        estimate = _stft(wave, window, hop, fft, frames)
        spectrum = magnitude * np.exp(1j * np.angle(estimate))
    wave = _istft(spectrum, window, hop, samples)
    peak = np.abs(wave).max()
    return (0.9 * wave / peak if peak > 0 else wave).astype(np.float32)
