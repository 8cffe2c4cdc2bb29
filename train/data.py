"""Manifest data: Synergy-CLIP's CSV (``img_path, wav_path, label, caption``) -> tri-modal batches.

Paths are relative to the CSV; an empty cell means that modality is missing for the row. A row whose file is
missing or undecodable becomes a *bad sample* naming its path and row number: the collate function drops it and
the trainer counts it (``on_bad_sample="skip"``) or stops with that message (``"error"``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
from PIL import Image
from tokenizers import Tokenizer

COLUMNS = ("img_path", "wav_path", "label", "caption")


class DataError(ValueError):
    """A manifest or a sample that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Row:
    line: int  # line number in the CSV (header = 1), for error messages
    image: Path | None
    audio: Path | None
    label: str
    caption: str


def read_manifest(path: str | Path) -> list[Row]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; create one with `synergy data synth --out DIR`")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; expected header {','.join(COLUMNS)}")
        root = path.parent
        rows = []
        for line, record in enumerate(reader, start=2):
            image, audio = (record["img_path"] or "").strip(), (record["wav_path"] or "").strip()
            rows.append(
                Row(
                    line=line,
                    image=root / image if image else None,
                    audio=root / audio if audio else None,
                    label=(record["label"] or "").strip(),
                    caption=(record["caption"] or "").strip(),
                )
            )
    if not rows:
        raise DataError(f"{path}: the manifest has a header but no rows")
    return rows


def load_image(path: Path, size: int, mean, std, rng: np.random.Generator | None) -> np.ndarray:
    """-> [3, size, size] float32. Training (``rng`` given): random resized crop over 80-100% of the area."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    if rng is not None:
        scale = rng.uniform(0.8, 1.0)
        cw, ch = max(1, round(w * math.sqrt(scale))), max(1, round(h * math.sqrt(scale)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BICUBIC)
    else:  # shortest edge to size, then centre crop: what the runtime does
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        x, y = (w - size) // 2, (h - size) // 2
        img = img.crop((x, y, x + size, y + size))
    pixels = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def load_audio(path: Path, sample_rate: int, clip_samples: int, rng: np.random.Generator | None) -> np.ndarray:
    """-> [clip_samples] float32 mono at ``sample_rate``. Training: random crop when longer; padding at the end."""
    wave, sr = soundfile.read(str(path), dtype="float32", always_2d=True)  # [T, C]
    if wave.shape[0] == 0:
        raise DataError("0 frames (empty audio)")
    if not np.isfinite(wave).all():
        raise DataError("NaN or Inf samples")
    wave = wave.mean(axis=1)
    if sr != sample_rate:
        wave = soxr.resample(wave, sr, sample_rate).astype(np.float32)
    if len(wave) > clip_samples:
        start = int(rng.integers(0, len(wave) - clip_samples + 1)) if rng is not None else 0
        wave = wave[start : start + clip_samples]
    return np.pad(wave, (0, clip_samples - len(wave)))


class ManifestDataset(torch.utils.data.Dataset):
    """Items are ``(row index, augmentation seed)`` pairs, so augmentation is a pure function of the sampler's
    output: a resumed run and a DDP rank see exactly the samples an uninterrupted single process would.
    ``augment_seed=None`` means evaluation: no augmentation, first template."""

    def __init__(self, rows, *, image_size, mean, std, sample_rate, clip_seconds, text_mode, templates):
        if text_mode not in ("prompt", "caption", "mixed"):
            raise DataError(f"text_mode {text_mode!r}: choose prompt, caption or mixed")
        self.rows = rows
        self.image_size, self.mean, self.std = image_size, mean, std
        self.sample_rate, self.clip_samples = sample_rate, round(clip_seconds * sample_rate)
        self.text_mode, self.templates = text_mode, tuple(templates)

    def __len__(self) -> int:
        return len(self.rows)

    def _text(self, row: Row, rng) -> str:
        use_caption = row.caption and (
            self.text_mode == "caption" or (self.text_mode == "mixed" and rng.random() < 0.5)
        )
        if use_caption or not row.label:
            return row.caption
        template = self.templates[int(rng.integers(len(self.templates)))] if rng is not None else self.templates[0]
        return template.format(row.label)

    def __getitem__(self, item):
        index, augment_seed = item if isinstance(item, tuple) else (item, None)
        row = self.rows[index]
        rng = np.random.default_rng(augment_seed) if augment_seed is not None else None
        sample = {"index": index, "label": row.label, "bad": None}
        current = None
        try:
            current = row.image
            sample["image"] = (
                load_image(row.image, self.image_size, self.mean, self.std, rng) if row.image is not None else None
            )
            current = row.audio
            sample["audio"] = (
                load_audio(row.audio, self.sample_rate, self.clip_samples, rng) if row.audio is not None else None
            )
        except Exception as error:  # any decoder failure is this sample's problem, reported with its row
            reason = str(error) or type(error).__name__
            if isinstance(error, FileNotFoundError) or (current is not None and not current.exists()):
                reason = "file not found"
            sample["bad"] = f"{current}: {reason} (manifest line {row.line})"
        sample["text"] = self._text(row, rng if rng is not None else np.random.default_rng(0))
        return sample


class Collate:
    """Samples -> batch dict of tensors with per-modality validity masks. A bad sample stays in the batch as a row
    with every modality masked out (so every DDP rank keeps the same batch shape) and its message is listed."""

    def __init__(self, tokenizer: Tokenizer, image_size: int, clip_samples: int):
        self.tokenizer, self.image_size, self.clip_samples = tokenizer, image_size, clip_samples

    def __call__(self, samples):
        n = len(samples)
        image = torch.zeros(n, 3, self.image_size, self.image_size)
        waveform = torch.zeros(n, self.clip_samples)
        has = {m: torch.zeros(n, dtype=torch.bool) for m in ("image", "audio", "text")}
        for i, s in enumerate(samples):
            if s["bad"]:
                continue
            if s["image"] is not None:
                image[i], has["image"][i] = torch.from_numpy(s["image"]), True
            if s["audio"] is not None:
                waveform[i], has["audio"][i] = torch.from_numpy(s["audio"]), True
            has["text"][i] = bool(s["text"])
        encodings = self.tokenizer.encode_batch([s["text"] or "" for s in samples])
        return {
            "pixel_values": image,  # [B, 3, H, W]
            "waveform": waveform,  # [B, T]
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),  # [B, L]
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
            "image_mask": has["image"],
            "audio_mask": has["audio"],
            "text_mask": has["text"],
            "labels": [s["label"] for s in samples],
            "indices": [s["index"] for s in samples],
            "bad": [s["bad"] for s in samples if s["bad"]],
        }


class EpochBatches(torch.utils.data.Sampler):
    """Global batches of ``(row, augmentation seed)`` from a per-epoch permutation seeded by ``(seed, epoch)``,
    starting at ``start_step``; a DDP rank takes its contiguous slice of each global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int, rank=0, world=1):
        if batch_size % world:
            raise DataError(f"batch_size {batch_size} must be divisible by the number of processes ({world})")
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
            if len(batch) < self.batch_size:  # fewer rows than one batch: wrap around
                batch = (batch * (self.batch_size // max(1, len(batch)) + 1))[: self.batch_size]
            mine = batch[self.rank * local : (self.rank + 1) * local]
            yield [(i, hash((self.seed, step, slot + self.rank * local)) & 0x7FFFFFFF) for slot, i in enumerate(mine)]
