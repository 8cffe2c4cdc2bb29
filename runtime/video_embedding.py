"""Videos -> embeddings: the frames pooled, the soundtrack through the long-audio windows, and the two fused.

A video is its frames (images) and its soundtrack (audio), decoded by ``video.load_video``: the image embedding is the
normalised mean of the frames' normalised embeddings (CLIP4VLA's pooling), the audio embedding the soundtrack through
the long-audio windows, and the two are fused as ``classify(audio=, image=)`` fuses them. A bad video fails alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import window_spans
from .embedding import compute
from .errors import InputError, UnsupportedVideo, non_finite
from .image import preprocess_with
from .search import l2_normalise
from .towers import Towers
from .video import describe_video, load_video


@dataclass(frozen=True)
class VideoEmbeddings:
    """Per-video embeddings [N, D] float32: the pooled frames, the soundtrack, and both fused; NaN rows where a video
    has no such stream or failed (``errors[i]``). ``modalities[i]``: the streams video i was embedded from."""

    image: np.ndarray
    audio: np.ndarray
    fused: np.ndarray
    modalities: tuple[tuple[str, ...], ...]
    errors: tuple[InputError | None, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class VideoSettings:
    batch_size: int
    audio_overlap: float
    max_audio_seconds: float
    max_frames: int
    frames_per_second: float


def embed_videos(towers: Towers, videos, settings: VideoSettings) -> VideoEmbeddings:
    """Paths or video-file bytes -> ``VideoEmbeddings``; a bad video fails alone (NaN rows, its error)."""
    items = [videos] if isinstance(videos, (str, Path, bytes, bytearray, memoryview)) else list(videos)
    manifest = towers.manifest
    rate = manifest.audio.sample_rate
    clip = round(manifest.audio.clip_seconds * rate)
    frames, sounds, errors, sources = [], [], [], []  # frames: (video, [3, S, S]); sounds: (video, value)
    present = np.zeros((len(items), 2), bool)  # [N, (image, audio)]: the streams each video decoded
    for index, item in enumerate(items):
        name = describe_video(item, index)
        try:
            video = load_video(
                item,
                rate,
                name=name,
                max_frames=settings.max_frames,
                frames_per_second=settings.frames_per_second,
                max_seconds=settings.max_audio_seconds,
                frame_transform=lambda image: preprocess_with(image, manifest.image),
                frames="image" in manifest.towers,
                audio="audio" in manifest.towers,
            )
            if not video.frames and video.audio is None:
                raise UnsupportedVideo(name, "has no stream this bundle's towers can embed")
            frames += [(index, f) for f in video.frames]
            present[index] = bool(video.frames), video.audio is not None
            if video.audio is not None:
                spans = window_spans(video.audio.shape[0], clip, settings.audio_overlap)
                sounds.append((index, (video.audio, spans)))
            errors.append(None)
        except InputError as error:
            errors.append(error)
        sources.append(name)
    dim = manifest.embed_dim
    image = np.full((len(items), dim), np.nan, np.float32)
    audio = np.full((len(items), dim), np.nan, np.float32)
    if frames:
        owners = np.array([owner for owner, _ in frames])
        pooled = np.zeros((len(items), dim), np.float64)
        frame_vectors = compute(towers, "image", [f for _, f in frames], settings.batch_size)  # [F, D]
        np.add.at(pooled, owners, frame_vectors)  # -> [N, D]
        with_frames = np.unique(owners)
        image[with_frames] = l2_normalise(pooled[with_frames])
    if sounds:
        audio[[owner for owner, _ in sounds]] = compute(towers, "audio", [v for _, v in sounds], settings.batch_size)
    for index in np.flatnonzero(present.any(1)):  # a decoded stream with a non-finite embedding fails its video
        rows = zip(("image", "audio"), (image[index], audio[index]), present[index])
        bad = [modality for modality, row, decoded in rows if decoded and not np.isfinite(row).all()]
        if bad:
            errors[index] = non_finite(bad[0], sources[index])
            present[index] = False
    modalities = tuple(tuple(m for m, on in zip(("image", "audio"), row) if on) for row in present)
    both = np.where(present[:, :, None], np.stack([image, audio], axis=1), 0.0).sum(1)  # [N, D]
    with np.errstate(invalid="ignore"):
        fused = np.where(present.any(1)[:, None], l2_normalise(both), np.nan).astype(np.float32)
    return VideoEmbeddings(image, audio, fused, modalities, tuple(errors), tuple(sources))
