"""Audio in: decode (soundfile), check, downmix, resample (soxr), and cut into the model's clips.

Rules, chosen here and documented in the README:

- Mono or stereo only (``MAX_CHANNELS = 2``); stereo is downmixed by averaging the channels. More channels are
  refused rather than guessed at (a 5.1 film mix or a microphone array is rarely what the caller meant).
- The duration is checked from the header, before anything is decoded (``max_seconds``, default 10 minutes).
- A file whose header promises more frames than it holds is truncated and refused, as are 0 frames and NaN/Inf.
- Audio shorter than one kaldi analysis frame (25 ms) is refused: it has no frame, so the model would see only
  padding. Audio up to one clip is one window that keeps its real length: the window is zero-padded to the clip
  for batching, and its length travels with it, so the model pads in the log-mel domain exactly as transformers'
  ``ASTFeatureExtractor`` does (a waveform padded with zeros would give different features). Longer audio is cut
  into full clips every ``clip * (1 - overlap)`` samples (default overlap 0.5); a last clip aligned to the end
  covers the tail, so every window is real audio. The caller mean-pools the window embeddings and re-normalises.

Training, ``synergy eval`` and the runtime all cut windows with :func:`window_spans` and :func:`cut_window`: one
source of truth, so the same file gives the same embedding everywhere (training adds only its random crop).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import soundfile
import soxr

from .errors import UnsupportedAudio

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf")
MAX_CHANNELS = 2
DEFAULT_MAX_SECONDS = 600.0
DEFAULT_OVERLAP = 0.5


def kaldi_frame_sizes(sample_rate: int) -> tuple[int, int, int]:
    """Kaldi's frame length (25 ms), frame shift (10 ms) and FFT size (next power of two) in samples."""
    frame_length = sample_rate * 25 // 1000
    hop_length = sample_rate * 10 // 1000
    fft_length = 1 << (frame_length - 1).bit_length()
    return frame_length, hop_length, fft_length


def count_frames(num_samples: int, sample_rate: int) -> int:
    """Kaldi snip-edges frames in ``num_samples``: only frames that lie wholly inside the audio count."""
    frame_length, hop_length, _ = kaldi_frame_sizes(sample_rate)
    return 0 if num_samples < frame_length else 1 + (num_samples - frame_length) // hop_length


def describe_audio(source, index: int) -> str:
    """A short name for an input, used in error messages and results."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<audio bytes #{index}, {len(source)} B>"
    return f"<waveform #{index}>"


def load_audio(
    source,
    sample_rate: int,
    *,
    name: str | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_channels: int = MAX_CHANNELS,
) -> np.ndarray:
    """Decode one input to a mono float32 waveform at ``sample_rate``: [T].

    ``source``: a path, the bytes of an audio file, or ``(waveform, sample_rate)`` with a waveform [T], [T, C] or
    [C, T] (C <= ``max_channels``; integer PCM is scaled to [-1, 1]). Raises ``UnsupportedAudio`` naming the input.
    """
    name = name or describe_audio(source, 0)
    if isinstance(source, tuple):
        if len(source) != 2:
            raise UnsupportedAudio(name, "a waveform must be passed as (array, sample_rate)")
        samples, rate = _check_waveform(source[0], source[1], name, max_seconds, max_channels)
    else:
        samples, rate = _decode(source, name, max_seconds, max_channels)
    wave = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]  # [T]: downmix to mono
    if not np.isfinite(wave).all():
        first = int(np.argmin(np.isfinite(wave)))
        raise UnsupportedAudio(
            name, f"contains NaN or Inf samples (first at {first / rate:.3f} s); the audio is corrupt, re-encode it"
        )
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ")
    minimum = kaldi_frame_sizes(sample_rate)[0]
    if wave.shape[0] < minimum:
        raise UnsupportedAudio(
            name,
            f"{wave.shape[0] / sample_rate * 1000:.1f} ms long, shorter than one analysis frame "
            f"({minimum * 1000 // sample_rate} ms = {minimum} samples at {sample_rate} Hz); pass at least that much",
        )
    return np.ascontiguousarray(wave, dtype=np.float32)


def _decode(source, name: str, max_seconds: float, max_channels: int) -> tuple[np.ndarray, int]:
    """File or bytes -> ([T, C] float32, sample rate), refusing what cannot be trusted before decoding it."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise UnsupportedAudio(name, "no such file; check the path")
        if path.is_dir():
            raise UnsupportedAudio(name, "is a folder; pass audio files (the CLI expands folders and globs)")
        opened = str(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UnsupportedAudio(name, "empty bytes; pass the bytes of an audio file (WAV, FLAC, OGG, MP3)")
        opened = io.BytesIO(bytes(source))
    else:
        raise UnsupportedAudio(
            name, f"unsupported input of type {type(source).__name__}; pass a path, bytes or (waveform, sample_rate)"
        )
    try:
        with soundfile.SoundFile(opened) as file:
            frames, rate, channels, header = file.frames, file.samplerate, file.channels, file.extra_info
            estimated = file.format == "MP3"  # without a Xing/LAME header, an MP3's frame count is an estimate
            _check_header(name, frames, rate, channels, header, max_seconds, max_channels)
            samples = file.read(dtype="float32", always_2d=True)  # [T, C]
    except UnsupportedAudio:
        raise
    except (RuntimeError, TypeError, OSError) as error:  # LibsndfileError is a RuntimeError
        problem = getattr(error, "error_string", None) or str(error)
        raise UnsupportedAudio(
            name, f"cannot be decoded as audio ({problem}); pass a WAV, FLAC, OGG or MP3 file, or re-encode it"
        ) from error
    if samples.shape[0] < (0.98 * frames if estimated else frames):
        raise UnsupportedAudio(
            name, f"truncated: the header promises {frames} frames but only {samples.shape[0]} decode; re-encode it"
        )
    return samples, rate


def _check_header(name, frames, rate, channels, header: str, max_seconds, max_channels) -> None:
    if frames <= 0:
        raise UnsupportedAudio(name, "0 frames (empty audio); pass a recording at least one sample long")
    if rate <= 0:
        raise UnsupportedAudio(name, f"sample rate {rate} Hz in the header; the file is corrupt, re-encode it")
    if frames / rate > max_seconds:
        raise UnsupportedAudio(
            name, f"{frames / rate:.1f} s long, over the {max_seconds:g} s limit; cut it or raise max_audio_seconds"
        )
    if channels > max_channels:
        raise UnsupportedAudio(
            name, f"{channels} channels; only mono or stereo is read, downmix it first (e.g. `ffmpeg -i in -ac 1 out`)"
        )
    # libsndfile clamps a too-short WAV/AIFF data chunk to what the file holds and notes "(should be N)" in its
    # header log: that is a truncated file, whose frame count alone would look fine.
    for line in header.splitlines():
        if line.split(":")[0].strip() in ("data", "SSND") and "(should be" in line:
            raise UnsupportedAudio(name, f"truncated: header and file length disagree ({line.strip()}); re-encode it")


def _check_waveform(samples, rate, name: str, max_seconds: float, max_channels: int) -> tuple[np.ndarray, int]:
    """(array, rate) -> ([T, C] float32, rate). A 2-D array's channel axis is its short one (<= max_channels)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise UnsupportedAudio(name, f"sample rate must be a positive integer (Hz), got {rate!r}")
    rate = int(rate)
    samples = np.asarray(samples)
    if samples.dtype.kind not in "fiu":
        raise UnsupportedAudio(name, f"waveform of dtype {samples.dtype}; pass float samples in [-1, 1] or int PCM")
    if samples.ndim == 1:
        samples = samples[:, None]
    elif samples.ndim == 2:
        if samples.shape[0] <= max_channels < samples.shape[1]:
            samples = samples.T  # [C, T] -> [T, C]
    else:
        raise UnsupportedAudio(name, f"waveform of shape {samples.shape}; pass [T], [T, C] or [C, T]")
    if samples.shape[0] == 0:
        raise UnsupportedAudio(name, "0 samples (empty audio); pass a recording at least one sample long")
    if samples.shape[1] > max_channels:
        raise UnsupportedAudio(name, f"{samples.shape[1]} channels; only mono or stereo is read, downmix it first")
    if samples.shape[0] / rate > max_seconds:
        raise UnsupportedAudio(
            name, f"{samples.shape[0] / rate:.1f} s long, over the {max_seconds:g} s limit; cut it first"
        )
    if samples.dtype.kind == "f":
        return samples.astype(np.float32, copy=False), rate
    if samples.dtype.kind == "u":  # unsigned PCM (8-bit WAV) is centred on its midpoint
        half = float(2 ** (8 * samples.dtype.itemsize - 1))
        return ((samples.astype(np.float64) - half) / half).astype(np.float32), rate
    full = float(2 ** (8 * samples.dtype.itemsize - 1))
    return (samples.astype(np.float64) / full).astype(np.float32), rate


def window_spans(length: int, clip_samples: int, overlap: float = DEFAULT_OVERLAP) -> list[tuple[int, int]]:
    """The windows of a waveform of ``length`` samples as ``(start, stop)`` spans, each at most one clip long.

    Up to one clip: one span, the whole audio (its real length is kept; see the module docstring). Longer: full
    clips starting every ``clip_samples * (1 - overlap)`` samples, plus one aligned to the end when the last start
    leaves a tail. Spans rather than arrays, so long files cost no copies until a batch is cut.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= clip_samples:
        return [(0, length)]
    hop = max(1, round(clip_samples * (1.0 - overlap)))
    starts = list(range(0, length - clip_samples + 1, hop))
    if starts[-1] + clip_samples < length:
        starts.append(length - clip_samples)
    return [(start, start + clip_samples) for start in starts]


def cut_window(wave: np.ndarray, span: tuple[int, int], clip_samples: int) -> tuple[np.ndarray, int]:
    """One window of ``wave`` [T] -> (samples zero-padded to the clip [clip_samples] float32, real length)."""
    start, stop = span
    window = np.zeros(clip_samples, np.float32)
    window[: stop - start] = wave[start:stop]
    return window, stop - start


def audio_windows(
    wave: np.ndarray, clip_samples: int, overlap: float = DEFAULT_OVERLAP
) -> tuple[np.ndarray, np.ndarray]:
    """A waveform [T] -> (windows [W, clip_samples] float32, real lengths [W] int64): what the audio graph takes."""
    cut = [cut_window(wave, span, clip_samples) for span in window_spans(wave.shape[0], clip_samples, overlap)]
    return np.stack([w for w, _ in cut]), np.array([n for _, n in cut], np.int64)
