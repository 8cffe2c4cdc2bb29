"""Spoken words from espeak-ng voices, paired with pictures of the words: a set for generalisation to unseen speakers.

Each row is one word (``WORDS``) said by one speaker (an espeak-ng voice + variant, ``TRAIN_SPEAKERS`` or
``UNSEEN_SPEAKERS``) at one speed, as a 22.05 kHz WAV of 0.4-1 s with the silence espeak-ng puts around it cut
off, and a picture of the written word (Pillow's font at a random size, place, tilt and colour, with noise). The
label is the word. Three splits:

    train.csv    the training speakers at the training speeds
    val.csv      the same speakers and speeds (voices heard in training), other pitch and gain draws
    unseen.csv   speakers never heard in training, at speeds never used in training

so ``unseen`` against ``val`` measures how much of the audio tower's skill is the voices it was trained on. Clips
are shorter than a 1 s model clip, as single spoken words are: most of the tower's input is padding.

Every sample is a pure function of ``(seed, split, speaker, word, index)``. espeak-ng (the Debian/Ubuntu package
``espeak-ng``) must be on PATH. Layout::

    out/spoken.json                          # written first: settings, words, speakers per split
    out/images/{split}/{word}_{speaker}_{0003}.png
    out/audio/{split}/{word}_{speaker}_{0003}.wav
    out/train.csv  out/val.csv  out/unseen.csv   # written last (temp + rename): a CSV present = its files exist
    out/labels.txt                           # the words, one per line
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw, ImageFont

WORDS = ("apple", "boat", "circle", "dog", "house", "key", "moon", "pencil", "river", "seven", "tiger", "window")
# voice+variant: accent and timbre together; the held-out ones differ in both from every training speaker
TRAIN_SPEAKERS = ("en-us+m1", "en-gb+f2", "en-gb-scotland+m3", "en-029+f4", "en-gb-x-rp+m5", "en-us+f1")
UNSEEN_SPEAKERS = ("en-gb-x-gbclan+m7", "en-us-nyc+f3", "en-gb-x-gbcwmd+m2")
TRAIN_SPEEDS = (130, 160, 190)  # words per minute
UNSEEN_SPEEDS = (145, 175)
MAX_SPEED = 400  # words per minute: past this espeak-ng speech stops sounding like speech
PITCH_RANGE = (35, 65)  # espeak-ng -p, drawn per clip
CAPTION_TEMPLATES = ("the spoken word {}.", "someone saying {}.", "the word {} written down.", "{}, said aloud.")
SAMPLE_RATE = 22_050  # espeak-ng's own rate: written as it comes
MIN_SECONDS, MAX_SECONDS = 0.4, 1.0
SILENCE = 0.02  # amplitude under which espeak-ng's lead-in and tail count as silence
MARGIN_SECONDS = 0.03  # kept either side of the word so onsets and releases are not clipped
SPLITS = ("train", "val", "unseen")
GENERATOR = "synergy.train.datasets.spoken"


class SpokenError(RuntimeError):
    """espeak-ng is missing or failed, or the output folder is in the way."""


@dataclass(frozen=True)
class SpokenSummary:
    """Where :func:`synthesize_spoken` wrote things, and how many rows each split has."""

    root: Path
    rows: dict  # split -> number of rows
    seconds: dict  # split -> (shortest, longest) clip in seconds

    def __str__(self) -> str:
        lines = [f"wrote {self.root}"]
        for split in SPLITS:
            low, high = self.seconds[split]
            lines.append(f"  {split + '.csv':<12} {self.rows[split]:>6} rows, clips {low:.2f}-{high:.2f} s")
        lines.append(f"  {'labels.txt':<12} {len(WORDS):>6} words")
        return "\n".join(lines)


def synthesize_spoken(
    out: str | Path,
    *,
    seed: int = 0,
    train_per_word: int = 8,
    val_per_word: int = 2,
    unseen_per_word: int = 4,
    image_size: int = 64,
    overwrite: bool = False,
) -> SpokenSummary:
    """Write the set into ``out``. ``*_per_word``: clips per word and speaker in that split (train: 6 speakers x 12
    words x 8 = 576 rows; val 144; unseen 3 x 12 x 4 = 144). ``out`` must be new or empty unless ``overwrite``."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SpokenError("espeak-ng is not on PATH; install it (Debian/Ubuntu: apt-get install espeak-ng)")
    per_word = {"train": train_per_word, "val": val_per_word, "unseen": unseen_per_word}
    if min(per_word.values()) < 1 or image_size < 16:
        raise ValueError(f"clips per word must be at least 1 ({per_word}) and image_size at least 16 ({image_size})")
    root = Path(out)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} is not empty; pass overwrite=True (--overwrite) to replace a spoken set there")
    root.mkdir(parents=True, exist_ok=True)
    speakers = {"train": TRAIN_SPEAKERS, "val": TRAIN_SPEAKERS, "unseen": UNSEEN_SPEAKERS}
    speeds = {"train": TRAIN_SPEEDS, "val": TRAIN_SPEEDS, "unseen": UNSEEN_SPEEDS}
    info = {"generator": GENERATOR, "seed": seed, "words": list(WORDS), "speakers": speakers, "speeds": speeds,
            "per_word": per_word, "sample_rate": SAMPLE_RATE, "image_size": image_size}  # fmt: skip
    (root / "spoken.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    rows, seconds = {}, {}
    for split_index, split in enumerate(SPLITS):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "audio" / split).mkdir(parents=True, exist_ok=True)
        lines, lengths = [], []
        for speaker_index, speaker in enumerate(speakers[split]):
            for word_index, word in enumerate(WORDS):
                for i in range(per_word[split]):
                    rng = np.random.default_rng([seed, split_index, speaker_index, word_index, i])
                    stem = f"{word}_{speaker.replace('+', '_')}_{i:04d}"
                    wave = speak(espeak, word, speaker, int(rng.choice(speeds[split])), int(rng.integers(*PITCH_RANGE)))
                    wave = wave * rng.uniform(0.5, 1.0) / max(float(np.abs(wave).max()), 1e-6)
                    soundfile.write(root / "audio" / split / f"{stem}.wav", wave.astype(np.float32), SAMPLE_RATE,
                                    subtype="PCM_16")  # fmt: skip
                    word_picture(word, image_size, rng).save(root / "images" / split / f"{stem}.png")
                    caption = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(word)
                    lines.append((f"images/{split}/{stem}.png", f"audio/{split}/{stem}.wav", word, caption))
                    lengths.append(len(wave) / SAMPLE_RATE)
        _write_csv(root / f"{split}.csv", lines)
        rows[split], seconds[split] = len(lines), (min(lengths), max(lengths))
    (root / "labels.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return SpokenSummary(root, rows, seconds)


def speak(espeak: str, word: str, speaker: str, speed: int, pitch: int) -> np.ndarray:
    """-> [T] float32 at 22.05 kHz, 0.4-1 s: the word with espeak-ng's silence cut off, sped up until it fits in
    ``MAX_SECONDS`` and padded with silence to ``MIN_SECONDS``."""
    while True:
        done = subprocess.run([espeak, "-v", speaker, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                              capture_output=True, timeout=30)  # fmt: skip
        if done.returncode != 0 or not done.stdout:
            message = done.stderr.decode(errors="replace").strip()
            raise SpokenError(f"espeak-ng -v {speaker} failed ({done.returncode}): {message}")
        wave, rate = soundfile.read(io.BytesIO(done.stdout), dtype="float32")
        if rate != SAMPLE_RATE:
            raise SpokenError(f"espeak-ng wrote {rate} Hz; expected {SAMPLE_RATE}")
        loud = np.nonzero(np.abs(wave) > SILENCE * np.abs(wave).max())[0]
        margin = int(MARGIN_SECONDS * rate)
        wave = wave[max(0, loud[0] - margin) : loud[-1] + margin]
        if len(wave) <= MAX_SECONDS * rate:
            break
        if speed >= MAX_SPEED:
            raise SpokenError(f"{word!r} by {speaker} lasts {len(wave) / rate:.2f} s even at {speed} words/min")
        speed += 20  # a slow speaker's long word: faster until it fits, as a real speaker in a hurry would
    short = int(MIN_SECONDS * rate) - len(wave)
    return np.pad(wave, (short // 2, short - short // 2)) if short > 0 else wave


def word_picture(word: str, size: int, rng: np.random.Generator) -> Image.Image:
    """The word written in a random colour, size, place and tilt on a noisy background of another colour."""
    background = rng.integers(0, 256, 3)
    ink = (background + rng.integers(96, 160, 3)) % 256  # far from the background in every channel
    canvas = Image.new("RGB", (size * 2, size * 2), tuple(int(c) for c in background))
    font = ImageFont.load_default(size=float(rng.uniform(0.22, 0.3) * size))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = size - (right - left) / 2 + rng.uniform(-0.15, 0.15) * size
    y = size - (bottom - top) / 2 + rng.uniform(-0.3, 0.3) * size
    draw.text((x - left, y - top), word, font=font, fill=tuple(int(c) for c in ink))
    canvas = canvas.rotate(
        float(rng.uniform(-15, 15)), resample=Image.BILINEAR, fillcolor=tuple(int(c) for c in background)
    )
    picture = np.asarray(canvas.crop((size // 2, size // 2, size // 2 + size, size // 2 + size)), dtype=np.float32)
    picture += rng.normal(0, 8, picture.shape)
    return Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))


def _write_csv(path: Path, lines: list[tuple]) -> None:
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("img_path", "wav_path", "label", "caption"))
        writer.writerows(lines)
    temporary.replace(path)
