"""Synthetic videos (``synergy data synth --videos``): the synthetic set's classes as short clips whose moving shape and
sound agree, encoded with PyAV (H.264 + AAC in MP4), so the video paths (decoding, ``synergy infer --video``,
``synergy data from-videos``, training from ``video_path``) are tested and demonstrated on real files.

A clip of class "red circle": the red circle glides in a straight line across a still textured background, and the
class's sound (``synth.render_sound``: pitch from the colour, timbre and rhythm from the shape) plays as it moves.
Every clip is a pure function of ``(seed, split, class, index)``, like the still set. Layout, beside the still set::

    out/videos/{split}/{red_circle}_{0007}.mp4
    out/{split}_videos.csv      # img_path, wav_path (empty), label, caption, video_path

:func:`write_video` is the one encoder (tests write their MP4 / WebM / MKV / MOV files with it).
"""

from __future__ import annotations

import colorsys
import csv
import math
import os
from pathlib import Path

import numpy as np

from synergy.runtime.video import import_av
from synergy.train.datasets.synth import (
    COLOURS,
    HUE_DEGREES,
    SHAPES,
    SPLITS,
    _shape_mask,
    _upsample,
    class_names,
    make_caption,
    render_sound,
)

VIDEO_COLUMNS = ("img_path", "wav_path", "label", "caption", "video_path")
# container -> (video codec, audio codec): the four the runtime promises to read
CODECS = {
    ".mp4": ("libx264", "aac"),
    ".webm": ("libvpx-vp9", "libopus"),
    ".mkv": ("libx264", "aac"),
    ".mov": ("libx264", "aac"),
}
_VIDEO_STREAM = 0x5EED_0F1D  # a seed stream of its own: the clips never share randomness with the stills


def write_video(path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None, sample_rate: int = 16_000):
    """frames [N, H, W, 3] uint8 (H, W even), audio [T] float32 mono at ``sample_rate`` (None: no audio stream) ->
    a video file whose codecs follow its suffix (``CODECS``; Opus is written at 48 kHz, its only rate)."""
    av = import_av()
    path = Path(path)
    video_codec, audio_codec = CODECS.get(path.suffix.lower(), CODECS[".mp4"])
    with av.open(str(path), "w") as out:
        video = out.add_stream(video_codec, rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = None
        if audio is not None:
            rate = 48_000 if audio_codec == "libopus" else sample_rate
            sound = out.add_stream(audio_codec, rate=rate, layout="mono")
        for pixels in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")))
        out.mux(video.encode(None))
        if sound is not None:
            if sound.rate != sample_rate:
                import soxr

                audio = soxr.resample(audio, sample_rate, sound.rate)
            frame = av.AudioFrame.from_ndarray(np.asarray(audio, np.float32)[None], format="flt", layout="mono")
            frame.sample_rate, frame.pts = sound.rate, 0  # times from 0: the muxer marks the codec's priming
            out.mux(sound.encode(frame))
            out.mux(sound.encode(None))


def render_video(shape: str, colour: str, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """-> [count, size, size, 3] uint8: the shape in its colour moving in a straight line over a still background."""
    bg_rgb = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.2, 0.85)), np.float32)
    blotches = rng.normal(0.0, 0.06, size=(5, 5, 3)).astype(np.float32)
    background = bg_rgb + np.stack([_upsample(blotches[..., ch], size) for ch in range(3)], axis=-1)
    hue = (HUE_DEGREES[colour] + rng.uniform(-10.0, 10.0)) / 360.0 % 1.0
    fg_rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0)), np.float32)
    radius = rng.uniform(0.22, 0.32) * size
    reach = size / 2 - radius - 1
    start, end = rng.uniform(-1.0, 1.0, size=(2, 2)) * reach + size / 2  # centres: inside the frame throughout
    angle = math.radians(rng.uniform(-20.0, 20.0))
    frames = []
    for i in range(count):
        cx, cy = start + (end - start) * (i / max(1, count - 1))
        alpha = _shape_mask(shape, size, cx, cy, radius, angle)[..., None]  # [S, S, 1]
        image = background * (1.0 - alpha) + fg_rgb * alpha + rng.normal(0.0, 0.02, (size, size, 3))
        frames.append((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    return np.stack(frames)


def synthesize_videos(
    out: str | Path,
    *,
    seed: int = 0,
    per_class: dict[str, int] | None = None,
    size: int = 64,
    seconds: float = 2.0,
    fps: int = 8,
    sample_rate: int = 16_000,
) -> dict[str, Path]:
    """Write ``out/videos/{split}/*.mp4`` and ``out/{split}_videos.csv`` (train and val: the training classes;
    heldout: the held-out ones). ``per_class``: clips per class and split (default train 8, val 2, heldout 2).
    -> {split: csv path}."""
    if size < 16 or size % 2:
        raise ValueError(f"size={size}: use an even size of at least 16 pixels (H.264 needs even sides)")
    if seconds < 0.5 or fps < 1:
        raise ValueError(f"seconds={seconds}, fps={fps}: use clips of at least 0.5 s and 1 frame per second")
    per_class = {"train": 8, "val": 2, "heldout": 2, **(per_class or {})}
    root = Path(out)
    train_classes, heldout_classes = class_names()
    grid = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    written = {}
    for split_id, split in enumerate(SPLITS):
        names = heldout_classes if split == "heldout" else train_classes
        rows = []
        (root / "videos" / split).mkdir(parents=True, exist_ok=True)
        for k in range(per_class[split]):
            for name in names:  # interleaved by class: any prefix covers every class
                class_id = grid.index(name)
                colour, shape = name.split(" ")
                streams = np.random.SeedSequence([seed, _VIDEO_STREAM, split_id, class_id, k]).spawn(3)
                image_rng, audio_rng, caption_rng = (np.random.default_rng(s) for s in streams)
                relative = f"videos/{split}/{name.replace(' ', '_')}_{k:04d}.mp4"
                target = root / relative
                if not target.is_file():
                    frames = render_video(shape, colour, size, round(seconds * fps), image_rng)
                    wave = render_sound(shape, colour, sample_rate, seconds, audio_rng)
                    partial = target.with_name(target.name + ".part.mp4")
                    write_video(partial, frames, fps, wave, sample_rate)
                    os.replace(partial, target)  # a file present is a whole file
                rows.append(("", "", name, make_caption(shape, colour, caption_rng), relative))
        path = root / f"{split}_videos.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(VIDEO_COLUMNS)
            writer.writerows(rows)
        written[split] = path
    return written
