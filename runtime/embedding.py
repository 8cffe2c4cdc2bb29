"""Inputs -> embeddings: each item decoded (a bad one fails alone, with its typed error), the good ones run in batches.

- Batching: inputs are decoded, then run ``batch_size`` at a time; text is padded to each batch's longest sequence.
- Long audio: windows of the model's clip (``audio_overlap``) whose embeddings are averaged and re-normalised; short
  audio is one window that keeps its real length, which the audio graph takes beside the samples, so padding never
  changes an embedding (see ``audio.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import cut_window, describe_audio, load_audio, window_spans
from .errors import InferUsageError, InputError
from .image import describe_image, load_image, preprocess_with
from .manifest import BundleError, Manifest
from .search import l2_normalise
from .text import check_text, tokenize
from .towers import Towers, text_input_names


@dataclass(frozen=True)
class EmbedResult:
    """Per-item embeddings of one call: ``vectors`` [N, D] float32 (NaN rows where ``errors[i]`` is set)."""

    vectors: np.ndarray
    errors: tuple[InputError | None, ...]
    sources: tuple[str, ...]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def as_items(modality: str, items) -> list:
    """One item or a sequence of items -> a list. A tuple is one waveform for audio; a 3-D array one image."""
    if isinstance(items, (str, Path, bytes, bytearray, memoryview)):
        return [items]
    if modality == "audio" and isinstance(items, tuple):
        return [items]
    if isinstance(items, np.ndarray):
        if modality == "image" and items.ndim in (2, 3):
            return [items]
        if modality == "image" and items.ndim == 4:
            return list(items)
        if modality == "audio":
            raise InferUsageError("a bare array is not audio: pass (waveform, sample_rate) tuples, the rate explicit")
        return list(items)
    if modality == "image" and hasattr(items, "getbands"):  # a PIL image
        return [items]
    return list(items)


def decode(
    manifest: Manifest, modality: str, items: list, audio_overlap: float, max_audio_seconds: float
) -> tuple[list, list[InputError | None], list[str]]:
    """items -> (model-ready values or None, errors or None, display names). Audio: (waveform [T], window
    spans); image: [3, S, S]; text: the string."""
    decoded, errors, sources = [], [], []
    rate = manifest.audio.sample_rate
    clip = round(manifest.audio.clip_seconds * rate)
    for index, item in enumerate(items):
        try:
            if modality == "audio":
                name = describe_audio(item, index)
                wave = load_audio(item, rate, name=name, max_seconds=max_audio_seconds)
                value = (wave, window_spans(wave.shape[0], clip, audio_overlap))
            elif modality == "image":
                name = describe_image(item, index)
                value = preprocess_with(load_image(item, name=name), manifest.image)
            else:
                name = item if isinstance(item, str) and len(item) <= 60 else f"<text #{index}>"
                value = check_text(item, name)
            decoded.append(value)
            errors.append(None)
        except InputError as error:
            decoded.append(None)
            errors.append(error)
        sources.append(name)
    return decoded, errors, sources


def compute(towers: Towers, modality: str, values: list, batch_size: int) -> np.ndarray:
    """Model-ready values (all good) -> embeddings [N, D]."""
    manifest = towers.manifest
    spec = manifest.towers.get(modality)
    if spec is None:
        raise BundleError(f"{towers.bundle}: this bundle has no {modality} tower; re-export it with one")
    batch_size = min(batch_size, towers.fixed_batch(modality) or batch_size)
    dim = manifest.embed_dim
    if not values:
        return np.zeros((0, dim), np.float32)
    if modality == "audio":
        clip = round(manifest.audio.clip_seconds * manifest.audio.sample_rate)
        windows = [(owner, span) for owner, (_, spans) in enumerate(values) for span in spans]
        wave_name, lengths_name = (t.name for t in spec.inputs)
        pooled = np.zeros((len(values), dim), np.float64)
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            cut = [cut_window(values[owner][0], span, clip) for owner, span in chunk]
            feeds = {wave_name: np.stack([w for w, _ in cut]), lengths_name: np.array([n for _, n in cut])}
            np.add.at(pooled, [owner for owner, _ in chunk], towers.run("audio", feeds))  # feeds: [b, clip], [b]
        return l2_normalise(pooled).astype(np.float32)  # mean of the window embeddings, re-normalised
    if modality == "image":
        name = spec.inputs[0].name
        chunks = [np.stack(values[i : i + batch_size]) for i in range(0, len(values), batch_size)]
        return np.concatenate([towers.run("image", {name: c}) for c in chunks])
    tokenizer = towers.tokenizer()
    ids_name, mask_name = text_input_names(spec)
    dtypes = {t.name: t.dtype for t in spec.inputs}
    out = []
    for i in range(0, len(values), batch_size):
        ids, mask = tokenize(tokenizer, values[i : i + batch_size])
        feeds = {ids_name: ids.astype(dtypes[ids_name]), mask_name: mask.astype(dtypes[mask_name])}
        out.append(towers.run("text", feeds))
    return np.concatenate(out)
