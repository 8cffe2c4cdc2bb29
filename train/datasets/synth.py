"""A synthetic tri-modal data set written as real files: PNG pictures, 16-bit WAV sounds and Synergy-CLIP CSVs.

A class is a combination of two attributes, a shape and a colour ("red circle"). Each modality shows both:

- picture: the shape filled in its colour (hue jittered, never off its family) at a random size, position and
  rotation, with a lighting gradient, on a low-saturation textured background, plus pixel noise;
- sound: the colour sets the pitch register (octave-spaced bands, ±0.2 octave jitter), the shape sets the timbre and
  the time pattern (pure steady tone, gated odd harmonics, rising or falling sweep, bright pings), with a random
  onset and length, amplitude jitter and background noise at 8-20 dB SNR;
- caption: a template with synonyms ("a crimson round disc", "the sound of a red circle"); ``label`` stays canonical.

Colour alone or shape alone leaves several classes possible (each colour has 4 training classes, each shape 3-4),
so a model has to read both factors. Four combinations (``HELDOUT_CLASSES``) never appear in train or val while
their words do appear in other classes: ``heldout.csv`` measures compositional generalisation.

Every sample is a pure function of ``(seed, split, class, index)``, so the bytes written do not depend on how many
worker processes render them. Layout::

    out/classes.json                      # written first: marks the folder as a synth output
    out/images/{split}/{red_circle}_{0007}.png
    out/audio/{split}/{red_circle}_{0007}.wav
    out/train.csv  out/val.csv  out/heldout.csv   # written last (temp + rename): a CSV present = its files exist
    out/labels.txt                        # every class, one per line: what `synergy infer --labels` reads

An existing output is replaced only with ``overwrite=True`` (CLI: ``--overwrite``).
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import math
import multiprocessing
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow")
# one combination per colour, four different shapes: every held-out word still appears in 3-4 training classes
HELDOUT_CLASSES = ("red triangle", "green star", "blue circle", "yellow square")

PROMPT_TEMPLATES = ("a {}.", "a photo of a {}.", "a picture of a {}.", "the sound of a {}.", "a {} sound.")

COLOUR_SYNONYMS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "grass-green"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon-yellow"),
}
SHAPE_SYNONYMS = {
    "circle": ("circle", "round disc", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "star": ("star", "five-pointed star", "starburst"),
    "cross": ("cross", "plus sign", "plus shape"),
}
CAPTION_TEMPLATES = (
    "a {colour} {shape}",
    "a {colour} {shape}.",
    "a picture of a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "the sound of a {colour} {shape}",
    "a {shape} coloured {colour}",
    "a {colour} {shape} on a noisy background",
    "this {shape} is {colour}",
    "a drawing of a {colour} {shape}, with its sound",
    "{colour} {shape}",
)

SPLITS = ("train", "val", "heldout")
COLUMNS = ("img_path", "wav_path", "label", "caption")
GENERATOR = "synergy.train.synth"  # the name in classes.json since the first release: earlier outputs stay recognised
FORMAT_VERSION = 1

HUE_DEGREES = {"red": 0.0, "green": 120.0, "blue": 225.0, "yellow": 55.0}
# one octave apart (>= 6 of 64 mel bins at 16 kHz); jitter ±0.2 and sweeps ±0.15 octave keep the bands disjoint, and the
# top band stays low enough that most harmonics fit under Nyquist (only yellow star's 4th and yellow square's 5th drop)
PITCH_HZ = {"red": 250.0, "green": 500.0, "blue": 1000.0, "yellow": 2000.0}
# harmonic number -> relative amplitude; the shape's timbre
HARMONICS = {
    "circle": {1: 1.0},
    "square": {1: 1.0, 3: 0.6, 5: 0.4},
    "triangle": {1: 1.0, 2: 0.5},
    "star": {1: 1.0, 2: 0.7, 3: 0.5, 4: 0.35},
    "cross": {1: 1.0, 3: 0.6},
}
_MISSING_STREAM = 7_919  # SeedSequence key for choosing which train rows lose a modality
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    train_csv: Path
    val_csv: Path
    heldout_csv: Path
    classes_json: Path
    train_classes: tuple[str, ...]
    heldout_classes: tuple[str, ...]
    templates: tuple[str, ...]
    n_train: int
    n_val: int
    n_heldout: int
    n_missing_image: int  # train rows with an empty img_path
    n_missing_audio: int  # train rows with an empty wav_path
    labels_txt: Path  # every class (train + held-out), one per line

    def __str__(self) -> str:
        """What a person wants after `synergy data synth`: where the files are and what they hold."""
        seen, held = len(self.train_classes), len(self.heldout_classes)
        return "\n".join(
            [
                f"wrote the synthetic tri-modal set to {self.root}",
                f"  {self.train_csv.name:<12} {self.n_train:>6} rows  ({self.n_missing_image} without image, "
                f"{self.n_missing_audio} without audio)",
                f"  {self.val_csv.name:<12} {self.n_val:>6} rows  (the {seen} training classes)",
                f"  {self.heldout_csv.name:<12} {self.n_heldout:>6} rows  ({held} held-out combinations: "
                f"{', '.join(self.heldout_classes)})",
                f"  {self.labels_txt.name:<12} {seen + held:>6} labels (for synergy infer --labels and synergy eval)",
                f"  {self.classes_json.name:<12} {'':>6} classes, prompt templates and generator settings",
            ]
        )


@dataclass(frozen=True)
class _Sample:
    split_id: int
    class_id: int  # index into the full shape x colour grid, so a class keeps its stream whatever is held out
    index: int
    image: str | None  # path relative to the output folder; None = not written (missing modality)
    audio: str | None


def class_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """-> (train classes, held-out classes), canonical labels such as "red circle", in a fixed order."""
    every = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    return tuple(n for n in every if n not in HELDOUT_CLASSES), tuple(n for n in every if n in HELDOUT_CLASSES)


def synthesize(
    out: str | Path,
    *,
    seed: int = 0,
    train_per_class: int = 160,
    val_per_class: int = 20,
    heldout_per_class: int = 20,
    image_size: int = 64,
    sample_rate: int = 16_000,
    clip_seconds: float = 1.0,
    missing_rate: float = 0.05,
    workers: int = 2,
    overwrite: bool = False,
) -> SynthSummary:
    """Write the data set into ``out`` and return where everything is.

    ``missing_rate``: the fraction of *train* rows (rounded) with an empty ``img_path`` or ``wav_path``, never both;
    val and held-out rows are complete. ``workers``: processes that render files (1 = in this process); the output
    is byte-identical for any value. ``out`` must be new or empty; a non-empty folder (an earlier synth output or
    anything else) needs ``overwrite=True``, which replaces only the paths this writes.
    """
    per_class = {"train": train_per_class, "val": val_per_class, "heldout": heldout_per_class}
    _check_arguments(per_class, image_size, sample_rate, clip_seconds, missing_rate)
    root = Path(out)
    _prepare_folder(root, overwrite)
    train_classes, heldout_classes = class_names()
    grid = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    info = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "train_classes": list(train_classes),
        "heldout_classes": list(heldout_classes),
        "templates": list(PROMPT_TEMPLATES),
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "seed": seed,
        "image_size": image_size,
        "sample_rate": sample_rate,
        "clip_seconds": clip_seconds,
        "per_class": per_class,
        "missing_rate": missing_rate,
    }
    classes_json = root / "classes.json"
    classes_json.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    samples = _plan_samples(root, grid, per_class, seed, missing_rate)
    _render_all(
        root, seed, image_size, sample_rate, clip_seconds, [s for split in SPLITS for s in samples[split]], workers
    )

    labels_txt = root / "labels.txt"
    labels_txt.write_text("\n".join(train_classes + heldout_classes) + "\n", encoding="utf-8")
    for split in SPLITS:
        _write_csv(root / f"{split}.csv", [_csv_row(s, grid, seed) for s in samples[split]])
    return _summary(root, classes_json, labels_txt, samples)


def _check_arguments(
    per_class: dict[str, int], image_size: int, sample_rate: int, clip_seconds: float, missing_rate: float
) -> None:
    """``synthesize``'s sizes and rates, each refused with what to use instead."""
    train_per_class, val_per_class, heldout_per_class = per_class["train"], per_class["val"], per_class["heldout"]
    if train_per_class < 1 or val_per_class < 0 or heldout_per_class < 0:
        raise ValueError(
            f"per-class counts must be train >= 1, val >= 0, held-out >= 0; got {train_per_class}, "
            f"{val_per_class}, {heldout_per_class}"
        )
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: use at least 16 pixels so the shapes stay recognisable")
    if sample_rate < 8_000:
        raise ValueError(f"sample_rate={sample_rate}: use at least 8000 Hz; the highest pitch band reaches ~2600 Hz")
    if clip_seconds < 0.25:
        raise ValueError(f"clip_seconds={clip_seconds}: use at least 0.25 s so rhythms (4-9 Hz) are audible")
    if not 0.0 <= missing_rate <= 1.0:
        raise ValueError(f"missing_rate={missing_rate}: expected a fraction in [0, 1]")


def _plan_samples(root: Path, grid: list[str], per_class: dict[str, int], seed: int, missing_rate: float):
    """-> {split: [_Sample]}: which files each split's rows get (train rows may miss one modality); makes the
    folders they go in."""
    train_classes, heldout_classes = class_names()
    classes = {"train": train_classes, "val": train_classes, "heldout": heldout_classes}
    samples: dict[str, list[_Sample]] = {}
    for split_id, split in enumerate(SPLITS):
        names = classes[split]
        # interleaved by class: any prefix of a CSV covers every class
        keys = [(grid.index(name), k) for k in range(per_class[split]) for name in names]
        drop = _missing_modalities(seed, len(keys), missing_rate) if split == "train" else {}
        rows = []
        for row, (class_id, k) in enumerate(keys):
            stem = f"{grid[class_id].replace(' ', '_')}_{k:04d}"
            image = None if drop.get(row) == "image" else f"images/{split}/{stem}.png"
            audio = None if drop.get(row) == "audio" else f"audio/{split}/{stem}.wav"
            rows.append(_Sample(split_id, class_id, k, image, audio))
        samples[split] = rows
        if rows:
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "audio" / split).mkdir(parents=True, exist_ok=True)
    return samples


def _summary(root: Path, classes_json: Path, labels_txt: Path, samples: dict[str, list[_Sample]]) -> SynthSummary:
    train_classes, heldout_classes = class_names()
    train = samples["train"]
    return SynthSummary(
        root=root,
        train_csv=root / "train.csv",
        val_csv=root / "val.csv",
        heldout_csv=root / "heldout.csv",
        classes_json=classes_json,
        train_classes=train_classes,
        heldout_classes=heldout_classes,
        templates=PROMPT_TEMPLATES,
        n_train=len(train),
        n_val=len(samples["val"]),
        n_heldout=len(samples["heldout"]),
        n_missing_image=sum(s.image is None for s in train),
        n_missing_audio=sum(s.audio is None for s in train),
        labels_txt=labels_txt,
    )


def synthesize_tiny(out: str | Path, seed: int = 0, **overrides) -> SynthSummary:
    """A few files per class for tests: 48 train rows (5 missing a modality), 32 val, 8 held-out; 32 px, 0.5 s."""
    kwargs = dict(
        seed=seed,
        train_per_class=3,
        val_per_class=2,
        heldout_per_class=2,
        image_size=32,
        clip_seconds=0.5,
        missing_rate=0.1,
        workers=1,
    )
    kwargs.update(overrides)
    return synthesize(out, **kwargs)


def is_synth_output(folder: str | Path) -> bool:
    """True when ``folder`` holds a ``classes.json`` written by this generator."""
    try:
        info = json.loads((Path(folder) / "classes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("generator") == GENERATOR


def _prepare_folder(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a folder; choose a folder path for --out")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            what = "holds an earlier synth output" if is_synth_output(root) else "is not empty"
            raise FileExistsError(
                f"{root}: folder {what}; choose a new or empty folder, or pass overwrite=True (CLI: --overwrite) "
                "to replace the files this generator writes (other files are kept)"
            )
        for name in ("images", "audio"):
            shutil.rmtree(root / name, ignore_errors=True)
        for name in ("classes.json", "labels.txt", *(f"{split}.csv" for split in SPLITS)):
            (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)


def _rngs(seed: int, sample: _Sample) -> list[np.random.Generator]:
    """-> [image rng, audio rng, caption rng]: independent streams that depend only on (seed, split, class, index)."""
    sequence = np.random.SeedSequence([seed, sample.split_id, sample.class_id, sample.index])
    return [np.random.default_rng(child) for child in sequence.spawn(3)]


def _missing_modalities(seed: int, n_rows: int, missing_rate: float) -> dict[int, str]:
    """-> {row: "image" | "audio"} for round(missing_rate * n_rows) rows chosen by the seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _MISSING_STREAM]))
    n_missing = round(missing_rate * n_rows)
    rows = rng.permutation(n_rows)[:n_missing]
    which = rng.random(n_missing) < 0.5
    return {int(r): ("image" if w else "audio") for r, w in zip(rows, which)}


def _render_all(root, seed, image_size, sample_rate, clip_seconds, samples, workers) -> None:
    jobs = [s for s in samples if s.image or s.audio]
    chunk = 64
    batches = [
        (str(root), seed, image_size, sample_rate, clip_seconds, jobs[i : i + chunk])
        for i in range(0, len(jobs), chunk)
    ]
    workers = max(1, min(int(workers), len(batches)))
    if workers == 1:
        for batch in batches:
            _render_batch(batch)
        return
    # fork where the platform has it: workers start in milliseconds and need nothing from a __main__ guard
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        for _ in pool.imap_unordered(_render_batch, batches):
            pass


def _render_batch(batch) -> None:
    root, seed, image_size, sample_rate, clip_seconds, samples = batch
    for sample in samples:
        image_rng, audio_rng, _ = _rngs(seed, sample)
        colour, shape = _attributes(sample.class_id)
        if sample.image:
            pixels = render_image(shape, colour, image_size, image_rng)
            Image.fromarray(pixels).save(os.path.join(root, sample.image), format="PNG")
        if sample.audio:
            wave = render_sound(shape, colour, sample_rate, clip_seconds, audio_rng)
            # encode in memory: closing a real file makes libsndfile fsync it, which costs more than the synthesis
            encoded = io.BytesIO()
            soundfile.write(encoded, wave, sample_rate, subtype="PCM_16", format="WAV")
            with open(os.path.join(root, sample.audio), "wb") as f:
                f.write(encoded.getvalue())


def _attributes(class_id: int) -> tuple[str, str]:
    return COLOURS[class_id // len(SHAPES)], SHAPES[class_id % len(SHAPES)]


# ---------------------------------------------------------------------------------------------------------- picture


def render_image(shape: str, colour: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """-> [size, size, 3] uint8: the shape in its colour over a textured, low-saturation background."""
    # background: a muted random tint (saturation <= 0.2), smooth blotches, so mean colour is a weak cue
    bg_rgb = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.2, 0.85)), np.float32)
    blotches = rng.normal(0.0, 0.06, size=(5, 5, 3)).astype(np.float32)
    blotches = np.stack([_upsample(blotches[..., ch], size) for ch in range(3)], axis=-1)  # [S, S, 3]
    background = bg_rgb + blotches

    # foreground: hue within ±10° of the colour's, bright enough that the family stays clear
    hue = (HUE_DEGREES[colour] + rng.uniform(-10.0, 10.0)) / 360.0 % 1.0
    fg_rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0)), np.float32)
    # circumradius 25-40% of the side, centre within ±12% of the middle: a shape spans several 8 px patches
    radius = rng.uniform(0.25, 0.40) * size
    cx, cy = size / 2 + rng.uniform(-1.0, 1.0, size=2) * min(0.12 * size, size / 2 - radius - 1)  # stays inside
    # a tilt of ±20°, not a full turn: a square stays a square (not a diamond), a cross a plus (not an x), which a
    # small ViT trained for minutes from scratch can learn; size, place, colour and background vary freely
    angle = math.radians(rng.uniform(-20.0, 20.0))
    alpha = _shape_mask(shape, size, cx, cy, radius, angle)  # [S, S] in [0, 1], anti-aliased

    # a lighting gradient across the shape: colour jitter that keeps the hue
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    direction = rng.uniform(0.0, 2 * math.pi)
    shade = 1.0 + rng.uniform(0.0, 0.2) * ((xx - cx) * math.cos(direction) + (yy - cy) * math.sin(direction)) / radius
    foreground = fg_rgb * shade[..., None]

    image = background * (1.0 - alpha[..., None]) + foreground * alpha[..., None]
    image += rng.normal(0.0, 0.03, size=image.shape).astype(np.float32)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float32)


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, r = cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, radius * _SUPERSAMPLE
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    else:
        points = _outline(shape)  # [N, 2] on the unit circle's scale
        c, s = math.cos(angle), math.sin(angle)
        rotated = points @ np.array([[c, s], [-s, c]], np.float64)
        draw.polygon([(x + r * px, y + r * py) for px, py in rotated], fill=255)
    mask = canvas.reduce(_SUPERSAMPLE)  # box filter: exact area coverage per output pixel
    return np.asarray(mask, np.float32) / 255.0


def _outline(shape: str) -> np.ndarray:
    if shape == "square":
        t = np.arange(4) * math.pi / 2 + math.pi / 4
    elif shape == "triangle":
        t = np.arange(3) * 2 * math.pi / 3 - math.pi / 2
    elif shape == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)
    elif shape == "cross":
        w = 0.3  # arm half-width, as a fraction of the arm length
        arm_tips = [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
        return np.array(arm_tips, np.float64) / math.hypot(1, w)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.stack([np.cos(t), np.sin(t)], axis=1)


# ------------------------------------------------------------------------------------------------------------ sound


def render_sound(shape: str, colour: str, sample_rate: int, clip_seconds: float, rng: np.random.Generator):
    """-> [round(sample_rate * clip_seconds)] float32 in (-1, 1): pitch register from colour, timbre from shape."""
    n = round(sample_rate * clip_seconds)
    t = np.arange(n, dtype=np.float64) / sample_rate
    f0 = PITCH_HZ[colour] * 2.0 ** rng.uniform(-0.2, 0.2)
    onset = rng.uniform(0.0, 0.2) * clip_seconds
    length = rng.uniform(0.6, 0.8) * clip_seconds
    seconds = t - onset  # time since the sound started; negative before it
    active = (seconds >= 0.0) & (seconds <= length)

    # instantaneous frequency: sweeps of ±0.15 octave stay inside the colour's band (bands are 1 octave apart)
    progress = np.clip(seconds / length, 0.0, 1.0)
    if shape == "triangle":
        freq = f0 * 2.0 ** (0.3 * (progress - 0.5))
    elif shape == "cross":
        freq = f0 * 2.0 ** (-0.3 * (progress - 0.5))
    else:
        freq = np.full(n, f0)
    cycles = np.cumsum(freq) / sample_rate  # float64: phase stays exact over the clip
    tone = np.zeros(n, np.float32)
    for harmonic, amplitude in HARMONICS[shape].items():
        if harmonic * freq.max() < 0.45 * sample_rate:
            gain = amplitude * rng.uniform(0.7, 1.3)
            turn = ((harmonic * cycles + rng.random()) % 1.0).astype(np.float32)  # wrapped: float32 sin is exact enough
            tone += np.float32(gain) * np.sin(np.float32(2 * np.pi) * turn)

    # time pattern: fades against clicks, then the shape's rhythm
    seconds = np.clip(seconds, 0.0, None).astype(np.float32)
    envelope = np.clip(seconds / 0.02, 0, 1) * np.clip((length - seconds) / 0.03, 0, 1) * active
    if shape == "square":  # gated beeps, ~4 per second
        rate = 4.0 * rng.uniform(0.85, 1.15)
        envelope *= np.clip(np.sin(np.float32(2 * np.pi * rate) * seconds) * 8.0 + 0.5, 0, 1)
    elif shape == "star":  # bright decaying pings, ~9 per second
        rate = 9.0 * rng.uniform(0.85, 1.15)
        envelope *= np.exp(-((seconds * np.float32(rate)) % 1.0) / np.float32(rate * 0.025))
    signal = tone * envelope

    # background noise: a random mix of white and brown (integrated) noise, 8-20 dB below the sound
    white = rng.standard_normal(n, dtype=np.float32)
    brown = np.cumsum(white, dtype=np.float64)
    window = 401  # subtract a 25 ms moving average (at 16 kHz): drops the random-walk drift, keeps the rumble
    sums = np.cumsum(np.concatenate([[0.0], np.pad(brown, window // 2, mode="edge")]))
    brown = (brown - (sums[window:] - sums[:-window]) / window).astype(np.float32)
    noise = rng.uniform(0, 1) * white / white.std() + rng.uniform(0, 1) * brown / (brown.std() + 1e-9)
    signal_rms = math.sqrt(float(np.mean(signal[active] ** 2))) if active.any() else 1.0
    noise *= signal_rms / (float(noise.std()) + 1e-9) / 10.0 ** (rng.uniform(8.0, 20.0) / 20.0)
    wave = signal + noise
    wave *= rng.uniform(0.3, 0.9) / (float(np.abs(wave).max()) + 1e-9)
    return wave.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------- caption


def make_caption(shape: str, colour: str, rng: np.random.Generator) -> str:
    """A template filled with the canonical words half the time, else with a synonym; "a" -> "an" before a vowel."""
    colour_word = colour if rng.random() < 0.5 else str(rng.choice(COLOUR_SYNONYMS[colour][1:]))
    shape_word = shape if rng.random() < 0.5 else str(rng.choice(SHAPE_SYNONYMS[shape][1:]))
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    text = template.format(colour=colour_word, shape=shape_word)
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def _csv_row(sample: _Sample, grid: list[str], seed: int) -> tuple[str, str, str, str]:
    colour, shape = _attributes(sample.class_id)
    caption = make_caption(shape, colour, _rngs(seed, sample)[2])
    return sample.image or "", sample.audio or "", grid[sample.class_id], caption


def _write_csv(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, path)
