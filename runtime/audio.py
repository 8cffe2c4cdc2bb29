"""Audio in: decode (soundfile), check, downmix, resample (soxr), and cut into the model's clips.

Rules, chosen here and documented in the README:

- Mono or stereo only (``MAX_CHANNELS = 2``); stereo is downmixed by averaging the channels. More channels are
  refused rather than guessed at (a 5.1 film mix or a microphone array is rarely what the caller meant).
- The duration is checked from the header, before anything is decoded (``max_seconds``, default 10 minutes), and
  so is the sample rate: above ``MAX_SAMPLE_RATE`` (384 kHz, the highest rate real recorders use) a file is refused,
  the limit in the message; below ``MIN_INPUT_SAMPLE_RATE`` (8 kHz, telephone audio, the lowest rate real
  recordings use) it is refused too, since a tiny file at 1 Hz would claim minutes of audio and cost minutes of work.
  Files are decoded and resampled in blocks (``DECODE_BLOCK`` frames, downmixed as they
  come), so memory is bounded by the *output* (``max_seconds`` at the model's rate), not by the file's rate: a
  1.75 MB FLAC at 655 kHz would otherwise decode to 5 GiB. Decoding stops with an error after
  ``max_decode_seconds`` (default 60 s) of wall time.
- Paths must be regular files (a FIFO would block forever, ``/dev/zero`` never ends).
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
import time
from pathlib import Path

import numpy as np
import soundfile
import soxr

from .errors import UnsupportedAudio
from .files import open_input
from .manifest import MAX_SAMPLE_RATE

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf")
MAX_CHANNELS = 2
MIN_INPUT_SAMPLE_RATE = 8_000  # Hz; see the module docstring
DEFAULT_MAX_SECONDS = 600.0
DEFAULT_OVERLAP = 0.5
DEFAULT_MAX_DECODE_SECONDS = 60.0
DECODE_BLOCK = 1 << 16  # frames decoded (and resampled) at a time


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
    max_decode_seconds: float = DEFAULT_MAX_DECODE_SECONDS,
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
        wave = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]  # [T]: downmix to mono
        _check_finite(wave, 0, rate, name)
        if rate != sample_rate:
            wave = soxr.resample(wave, rate, sample_rate, quality="HQ")
    else:
        wave = _decode(source, name, sample_rate, max_seconds, max_channels, max_decode_seconds)
    minimum = kaldi_frame_sizes(sample_rate)[0]
    if wave.shape[0] < minimum:
        raise UnsupportedAudio(
            name,
            f"{wave.shape[0] / sample_rate * 1000:.1f} ms long, shorter than one analysis frame "
            f"({minimum * 1000 // sample_rate} ms = {minimum} samples at {sample_rate} Hz); pass at least that much",
        )
    return np.ascontiguousarray(wave, dtype=np.float32)


def _check_finite(wave: np.ndarray, offset: int, rate: int, name: str) -> None:
    if not np.isfinite(wave).all():
        first = offset + int(np.argmin(np.isfinite(wave)))
        raise UnsupportedAudio(
            name, f"contains NaN or Inf samples (first at {first / rate:.3f} s); the audio is corrupt, re-encode it"
        )


def _decode(
    source, name: str, sample_rate: int, max_seconds: float, max_channels: int, max_decode_seconds: float
) -> np.ndarray:
    """File or bytes -> mono float32 [T] at ``sample_rate``, refusing what cannot be trusted before decoding it, then
    decoding, downmixing and resampling block by block (memory bounded by the output)."""
    if isinstance(source, (str, os.PathLike)):
        opened = open_input(Path(source), name, "audio", UnsupportedAudio)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UnsupportedAudio(name, "empty bytes; pass the bytes of an audio file (WAV, FLAC, OGG, MP3)")
        opened = io.BytesIO(bytes(source))
    else:
        raise UnsupportedAudio(
            name, f"unsupported input of type {type(source).__name__}; pass a path, bytes or (waveform, sample_rate)"
        )
    deadline = time.monotonic() + max_decode_seconds
    try:
        with opened, soundfile.SoundFile(opened) as file:
            frames, rate, channels, header = file.frames, file.samplerate, file.channels, file.extra_info
            estimated = file.format == "MP3"  # without a Xing/LAME header, an MP3's frame count is an estimate
            _check_header(name, frames, rate, channels, header, max_seconds, max_channels)
            stream = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ")
            pieces, decoded, limit = [], 0, int(max_seconds * rate) + DECODE_BLOCK
            while (block := file.read(DECODE_BLOCK, dtype="float32", always_2d=True)).shape[0]:  # [b, C]
                mono = block.mean(axis=1) if channels > 1 else block[:, 0]  # downmix to mono
                _check_finite(mono, decoded, rate, name)
                decoded += block.shape[0]
                pieces.append(stream.resample_chunk(mono) if rate != sample_rate else mono)
                if decoded > limit:  # a header that understates the length (MP3, OGG)
                    raise UnsupportedAudio(name, f"decodes to over the {max_seconds:g} s limit; cut it first")
                if time.monotonic() > deadline:
                    raise UnsupportedAudio(
                        name, f"decoding took over {max_decode_seconds:g} s (max_decode_seconds); re-encode it as WAV"
                    )
            if rate != sample_rate:
                pieces.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    except UnsupportedAudio:
        raise
    except (RuntimeError, TypeError, OSError) as error:  # LibsndfileError is a RuntimeError
        problem = getattr(error, "error_string", None) or str(error)
        raise UnsupportedAudio(
            name, f"cannot be decoded as audio ({problem}); pass a WAV, FLAC, OGG or MP3 file, or re-encode it"
        ) from error
    if decoded < (0.98 * frames if estimated else frames):
        raise UnsupportedAudio(
            name, f"truncated: the header promises {frames} frames but only {decoded} decode; re-encode it"
        )
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def _check_header(name, frames, rate, channels, header: str, max_seconds, max_channels) -> None:
    if frames <= 0:
        raise UnsupportedAudio(name, "0 frames (empty audio); pass a recording at least one sample long")
    if rate <= 0:
        raise UnsupportedAudio(name, f"sample rate {rate} Hz in the header; the file is corrupt, re-encode it")
    if rate > MAX_SAMPLE_RATE:
        raise UnsupportedAudio(
            name,
            f"sample rate {rate:,} Hz, above the {MAX_SAMPLE_RATE:,} Hz limit (no real recording needs more); "
            "resample it first (e.g. `ffmpeg -i in -ar 48000 out.flac`)",
        )
    _check_minimum_rate(name, rate)
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


def _check_minimum_rate(name: str, rate: int) -> None:
    if rate < MIN_INPUT_SAMPLE_RATE:
        raise UnsupportedAudio(
            name,
            f"sample rate {rate:,} Hz, below the {MIN_INPUT_SAMPLE_RATE:,} Hz minimum (no real recording is sampled "
            "that slowly: the header is wrong); resample it first (e.g. `ffmpeg -i in -ar 16000 out.wav`)",
        )


def _check_waveform(samples, rate, name: str, max_seconds: float, max_channels: int) -> tuple[np.ndarray, int]:
    """(array, rate) -> ([T, C] float32, rate). A 2-D array's channel axis is its short one (<= max_channels)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 0 < rate <= MAX_SAMPLE_RATE:
        raise UnsupportedAudio(
            name, f"sample rate must be a positive integer (Hz) up to {MAX_SAMPLE_RATE:,}, got {rate!r}"
        )
    rate = int(rate)
    _check_minimum_rate(name, rate)
    samples = np.asarray(samples)
    if samples.dtype.kind not in "fiu":
        raise UnsupportedAudio(name, f"waveform of dtype {samples.dtype}; pass float samples in [-1, 1] or int PCM")
    if samples.ndim == 1:
        samples = samples[:, None]
    elif samples.ndim == 2:
        shape = samples.shape
        if samples.shape[0] < samples.shape[1]:
            samples = samples.T  # [C, T] -> [T, C]: the channel axis is the short one
        if samples.shape[1] > max_channels:
            raise UnsupportedAudio(
                name,
                f"waveform of shape {shape}: {samples.shape[1]} channels (the short axis); only mono or stereo is "
                "read, downmix it first",
            )
    else:
        raise UnsupportedAudio(name, f"waveform of shape {samples.shape}; pass [T], [T, C] or [C, T]")
    if samples.shape[0] == 0:
        raise UnsupportedAudio(name, "0 samples (empty audio); pass a recording at least one sample long")
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
