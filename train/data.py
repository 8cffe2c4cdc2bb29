"""Manifest data: Synergy-CLIP's CSV (``img_path, wav_path, label, caption``) -> tri-modal batches.

Paths are relative to the CSV's folder; an empty cell means that modality is missing for the row. A row whose file
is missing or undecodable, a row with no modality at all and a row with too few columns become *bad samples* naming
the path and manifest line: the collate function masks them out and the trainer counts them
(``on_bad_sample="skip"``) or stops with that message (``"error"``).

Decoding and preprocessing are the runtime's (``synergy.runtime``: audio, image, windows, tokenizing), so training,
``synergy eval`` and ``synergy infer`` see the same input for the same file; training adds only a random crop of
long audio and a random resized crop of images, and not even those for a locked tower's modality (its features are
cached per distinct input, and an input that changes every epoch would never hit the cache).
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch
from PIL import Image
from tokenizers import Tokenizer

from synergy.runtime.audio import cut_window, load_audio, window_spans
from synergy.runtime.errors import InputError
from synergy.runtime.image import load_image, normalise_pixels, preprocess_image, preprocess_with
from synergy.runtime.prompts import fill_prompt
from synergy.runtime.text import tokenize
from synergy.runtime.video import load_video
from synergy.train.seeds import stable_seed

COLUMNS = ("img_path", "wav_path", "label", "caption")
VIDEO_COLUMN = "video_path"  # optional: a video whose frames and soundtrack stand in for an empty img/wav cell


class DataError(ValueError):
    """A manifest or a sample that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Row:
    line: int  # line number in the CSV (header = 1), for error messages
    image: Path | None
    audio: Path | None
    label: str
    caption: str
    problem: str | None = None  # why the row cannot be used (reported as a bad sample), None when it can
    video: Path | None = None  # optional column video_path: frames and soundtrack fill an empty img_path / wav_path


def read_manifest(path: str | Path) -> list[Row]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; check the path (a CSV with columns {','.join(COLUMNS)})")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; expected header {','.join(COLUMNS)}")
        width = len(reader.fieldnames)
        root = path.parent
        rows = []
        for record in reader:
            line = reader.line_num  # the CSV line the record ended on (captions may hold newlines)
            cells = {c: (record[c] or "").strip() for c in COLUMNS}
            video = (record.get(VIDEO_COLUMN) or "").strip()
            problem = None
            if None in record.values():
                problem = f"{sum(v is None for v in record.values())} of {width} columns missing"
            elif not any(cells.values()) and not video:
                problem = "no image, audio, label or caption: the row has no modality"
            rows.append(
                Row(
                    line=line,
                    image=root / cells["img_path"] if cells["img_path"] else None,
                    audio=root / cells["wav_path"] if cells["wav_path"] else None,
                    label=cells["label"],
                    caption=cells["caption"],
                    problem=problem,
                    video=root / video if video else None,
                )
            )
    if not rows:
        raise DataError(f"{path}: the manifest has a header but no rows")
    return rows


def random_resized_crop(path: Path, size: int, rng: np.random.Generator) -> Image.Image:
    """Training's image augmentation: a random crop over 80-100% of the area, resized to ``size`` x ``size``
    (bicubic), normalised by the caller. -> RGB PIL image."""
    image = load_image(path, name=str(path))
    w, h = image.size
    scale = rng.uniform(0.8, 1.0)
    cw, ch = max(1, round(w * math.sqrt(scale))), max(1, round(h * math.sqrt(scale)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((x, y, x + cw, y + ch)).resize((size, size), Image.Resampling.BICUBIC)


class ManifestDataset(torch.utils.data.Dataset):
    """Items are ``(row index, augmentation seed)`` pairs, so augmentation is a pure function of the sampler's
    output: a resumed run and a DDP rank see exactly the samples an uninterrupted single process would.
    ``augment_seed=None`` means evaluation: no augmentation, first template, and long audio cut into every
    window (as the runtime cuts it); training takes one random clip of long audio.

    ``unaugmented``: modalities that training feeds as evaluation does (a locked tower's): images resized, not
    cropped at random, the frame of a video at its middle, and long audio's first window (the runtime's first),
    not a random one. Text keeps its random prompt template: a handful of templates is a handful of cache entries.

    ``speed_perturb`` r > 0: training resamples each (augmented) clip by a factor from U(1 - r, 1 + r) before the crop
    (``TrainConfig.audio_speed_perturb``). ``image_preprocessing``: the image tower's ``ImagePreprocessing`` (its
    family's resize, filter, rescale); None: CLIP's, at ``image_size`` with ``mean`` and ``std``."""

    def __init__(
        self,
        rows,
        *,
        image_size,
        mean,
        std,
        sample_rate,
        clip_seconds,
        text_mode,
        templates,
        unaugmented=(),
        image_preprocessing=None,
        speed_perturb: float = 0.0,
    ):
        if text_mode not in ("prompt", "caption", "mixed"):
            raise DataError(f"text_mode {text_mode!r}: choose prompt, caption or mixed")
        self.rows = rows
        self.unaugmented = frozenset(unaugmented)
        self.image_size, self.mean, self.std = image_size, mean, std
        self.image_preprocessing = image_preprocessing
        self.sample_rate, self.clip_samples = sample_rate, round(clip_seconds * sample_rate)
        self.text_mode, self.templates = text_mode, tuple(templates)
        self.speed_perturb = speed_perturb

    @classmethod
    def for_model(
        cls, rows, model_config, text_mode: str = "caption", unaugmented=(), speed_perturb: float = 0.0
    ) -> ManifestDataset:
        """The dataset a model's own preprocessing asks for (image size and statistics, sample rate, clip, prompts):
        the one constructor training, evaluation and MMR share."""
        return cls(
            rows,
            image_size=model_config.image.image_size,
            mean=model_config.image.mean,
            std=model_config.image.std,
            sample_rate=model_config.audio.sample_rate,
            clip_seconds=model_config.audio.clip_seconds,
            text_mode=text_mode,
            templates=model_config.prompt_templates,
            unaugmented=unaugmented,
            speed_perturb=speed_perturb,
            image_preprocessing=model_config.image.preprocessing(),
        )

    def __len__(self) -> int:
        return len(self.rows)

    def _text(self, row: Row, rng) -> str:
        use_caption = row.caption and (
            self.text_mode == "caption" or (self.text_mode == "mixed" and rng.random() < 0.5)
        )
        if use_caption or not row.label:
            return row.caption
        template = self.templates[int(rng.integers(len(self.templates)))] if rng is not None else self.templates[0]
        return fill_prompt(template, row.label)

    def _image(self, path: Path, rng) -> np.ndarray:
        """-> [3, size, size] float32."""
        if rng is None or "image" in self.unaugmented:
            return self._frame(load_image(path, name=str(path)))
        return self._normalise(random_resized_crop(path, self.image_size, rng))

    def _audio(self, path: Path, rng, wave: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (windows [W, clip_samples] float32 zero-padded, real lengths [W] int64); W = 1 in training.
        ``wave``: the decoded samples (a video's soundtrack) instead of the file at ``path``."""
        wave = load_audio(path, self.sample_rate, name=str(path)) if wave is None else wave
        if rng is None:
            spans = window_spans(wave.shape[0], self.clip_samples)
        elif "audio" in self.unaugmented:
            spans = window_spans(wave.shape[0], self.clip_samples)[:1]
        else:
            if self.speed_perturb:
                factor = rng.uniform(1 - self.speed_perturb, 1 + self.speed_perturb)
                wave = speed_perturbed(wave, self.sample_rate, factor)
            start = int(rng.integers(0, max(0, wave.shape[0] - self.clip_samples) + 1))
            spans = [(start, min(wave.shape[0], start + self.clip_samples))]
        cut = [cut_window(wave, span, self.clip_samples) for span in spans]
        return np.stack([w for w, _ in cut]), np.array([n for _, n in cut], np.int64)

    def _video(self, row: Row, rng) -> dict:
        """A ``video_path`` row's missing image and audio from its video. Training: one frame at a random time,
        randomly cropped, and a random audio crop; evaluation: the runtime's uniform frames (``frames``
        [F, 3, S, S], pooled by the evaluator as ``Runtime.embed_video`` pools them) and every audio window."""
        need_image, need_audio = row.image is None, row.audio is None
        position = 0.5 if "image" in self.unaugmented else rng.random() if rng is not None else None
        video = load_video(
            row.video,
            self.sample_rate,
            name=str(row.video),
            frames=need_image,
            audio=need_audio,
            positions=[position] if rng is not None else None,
            frame_transform=None if rng is not None else self._frame,
        )
        out = {}
        if need_image and video.frames:
            if rng is None:
                out["frames"] = np.stack(video.frames)  # [F, 3, S, S]
                out["image"] = out["frames"][0]
            elif "image" in self.unaugmented:
                out["image"] = self._frame(Image.fromarray(video.frames[0]))
            else:
                crop = random_resized_crop(Image.fromarray(video.frames[0]), self.image_size, rng)
                out["image"] = self._normalise(crop)
        if need_audio and video.audio is not None:
            out["audio"] = self._audio(row.video, rng, wave=video.audio)
        return out

    def _frame(self, image: Image.Image) -> np.ndarray:
        if self.image_preprocessing is None:
            return preprocess_image(image, self.image_size, self.mean, self.std)
        return preprocess_with(image, self.image_preprocessing)

    def _normalise(self, crop: Image.Image) -> np.ndarray:
        scale = 1 / 255 if self.image_preprocessing is None else self.image_preprocessing.rescale_factor
        return normalise_pixels(crop, self.mean, self.std, scale)

    def __getitem__(self, item):
        index, augment_seed = item if isinstance(item, tuple) else (item, None)
        row = self.rows[index]
        rng = np.random.default_rng(augment_seed) if augment_seed is not None else None
        sample = {"index": index, "label": row.label, "bad": None, "image": None, "audio": None, "frames": None}
        current = None
        try:
            if row.problem:
                raise DataError(row.problem)
            current = row.image
            sample["image"] = self._image(row.image, rng) if row.image is not None else None
            current = row.audio
            sample["audio"] = self._audio(row.audio, rng) if row.audio is not None else None
            current = row.video
            if row.video is not None and (row.image is None or row.audio is None):
                sample.update(self._video(row, rng))
        except Exception as error:  # any decoder failure is this sample's problem, reported with its row
            reason = error.problem if isinstance(error, InputError) else (str(error) or type(error).__name__)
            where = f"{current}: " if current is not None else ""
            sample["bad"] = f"{where}{reason} (manifest line {row.line})"
            sample["image"] = sample["audio"] = sample["frames"] = None
        sample["text"] = self._text(row, rng if rng is not None else np.random.default_rng(0))
        return sample


def speed_perturbed(wave: np.ndarray, sample_rate: int, factor: float) -> np.ndarray:
    """``wave`` played ``factor`` times faster (pitch and tempo together): read as if sampled at ``factor x
    sample_rate`` and resampled back to ``sample_rate`` with the runtime's resampler (soxr HQ)."""
    return soxr.resample(wave, sample_rate * factor, sample_rate, quality="HQ").astype(np.float32)


class Collate:
    """Samples -> batch dict of tensors with per-modality validity masks. A bad sample stays in the batch as a row
    with every modality masked out (so every DDP rank keeps the same batch shape) and its message is listed.

    Audio comes as windows: ``waveform`` [W, clip] (zero-padded) with ``waveform_lengths`` [W] (real samples) and
    ``audio_owner`` [W] (the row of each window). Every row has at least one window (an empty one, length 0, where
    it has no audio), so with one window per row, as in training, ``waveform`` lines up with the rows."""

    def __init__(self, tokenizer: Tokenizer, image_size: int, clip_samples: int):
        self.tokenizer, self.image_size, self.clip_samples = tokenizer, image_size, clip_samples

    def __call__(self, samples):
        n = len(samples)
        image = torch.zeros(n, 3, self.image_size, self.image_size)
        has = {m: torch.zeros(n, dtype=torch.bool) for m in ("image", "audio", "text")}
        windows, lengths, owners = [], [], []
        for i, s in enumerate(samples):
            audio = None if s["bad"] else s["audio"]
            if audio is None:
                audio = (np.zeros((1, self.clip_samples), np.float32), np.zeros(1, np.int64))
            windows.append(audio[0])
            lengths.append(audio[1])
            owners += [i] * len(audio[1])
            if s["bad"]:
                continue
            if s["image"] is not None:
                image[i], has["image"][i] = torch.from_numpy(s["image"]), True
            has["audio"][i] = s["audio"] is not None
            has["text"][i] = bool(s["text"])
        ids, mask = tokenize(self.tokenizer, [s["text"] or "" for s in samples])
        batch = {
            "pixel_values": image,  # [B, 3, H, W]
            "waveform": torch.from_numpy(np.concatenate(windows)),  # [W, clip]
            "waveform_lengths": torch.from_numpy(np.concatenate(lengths)),  # [W]
            "audio_owner": torch.tensor(owners, dtype=torch.long),  # [W]
            "input_ids": torch.from_numpy(ids),  # [B, L]
            "attention_mask": torch.from_numpy(mask),
            "image_mask": has["image"],
            "audio_mask": has["audio"],
            "text_mask": has["text"],
            "labels": [s["label"] for s in samples],
            "indices": [s["index"] for s in samples],
            "bad": [s["bad"] for s in samples if s["bad"]],
        }
        # evaluation of video rows: every sampled frame, for pooling (``pixel_values`` holds each row's first)
        frames = [(i, s["frames"]) for i, s in enumerate(samples) if s.get("frames") is not None and not s["bad"]]
        if frames:
            batch["video_frames"] = torch.from_numpy(np.concatenate([f for _, f in frames]))  # [F, 3, H, W]
            batch["frame_owner"] = torch.tensor([i for i, f in frames for _ in f], dtype=torch.long)  # [F]
        return batch


def batch_for_rows(batch_size: int, rows: int, multiple: int = 1) -> int:
    """The global batch a manifest of ``rows`` rows can fill: ``batch_size``, or, when it holds fewer rows, the
    largest multiple of ``multiple`` (processes x micro-batches) up to ``rows``, with a warning. A batch larger than
    the data would hold some rows twice, and each copy would be the other's negative: the loss would push a row
    away from itself."""
    if rows >= batch_size:
        return batch_size
    fitted = rows // multiple * multiple
    if fitted == 0:
        raise DataError(
            f"the manifest has {rows} row(s), fewer than the {multiple} processes x micro-batches; add rows or "
            "lower accumulation (or the number of processes)"
        )
    warnings.warn(
        f"the manifest has {rows} rows, fewer than batch_size {batch_size}: training on batches of {fitted} "
        f"(every row once per batch; a row repeated in a batch would be its own negative). With so few rows, lock "
        "pretrained towers (lock=...) and expect little from towers trained from scratch",
        stacklevel=2,
    )
    return fitted


class EpochBatches(torch.utils.data.Sampler):
    """Global batches of ``(row, augmentation seed)`` from a per-epoch permutation seeded by ``(seed, epoch)``,
    starting at ``start_step``; a DDP rank takes its contiguous slice of each global batch. ``batch_size`` is at most
    ``n`` (:func:`batch_for_rows`), so no batch holds a row twice."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int, rank=0, world=1):
        if batch_size % world:
            raise DataError(f"batch_size {batch_size} must be divisible by the number of processes ({world})")
        if batch_size > n:
            raise DataError(f"batch_size {batch_size} exceeds the {n} rows; fit it with batch_for_rows")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps, self.rank, self.world = start_step, total_steps, rank, world
        self.per_epoch = max(1, n // batch_size)  # drop the ragged tail: every step sees a full batch

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self):
        local = self.batch_size // self.world
        for step in range(self.start_step, self.total_steps):
            epoch, position = divmod(step, self.per_epoch)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            batch = order[position * self.batch_size : (position + 1) * self.batch_size].tolist()
            mine = batch[self.rank * local : (self.rank + 1) * local]
            yield [(i, stable_seed(self.seed, step, slot + self.rank * local)) for slot, i in enumerate(mine)]
