"""Zero-shot classification: label embeddings from prompt ensembles (cached, bounded), logit scales, ranking.

- Labels: each label's embedding is the normalised mean of its normalised prompt embeddings (the manifest's
  templates, filled by ``prompts.fill_prompt``); cached per label, the least recently used dropped past
  ``LabelCache.max_labels``.
- Several modalities for one item: the item's embedding is the normalised mean of the modalities' normalised
  embeddings (``search.fuse_embeddings``); its logit scale is the mean of the modalities' scales. Audio -> label
  uses ``text_audio``, image -> label ``image_text``; text -> label (a pair the model never trained) uses the mean
  of the two. Probabilities are ``softmax(scale * cosine)`` over the labels.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError, non_finite
from .prompts import label_prompts
from .search import l2_normalise

LABEL_SCALE_PAIRS = {"audio": ("text_audio",), "image": ("image_text",), "text": ("image_text", "text_audio")}
DEFAULT_MAX_LABELS = 16_384  # cached label embeddings (16 MiB at D=256); a larger label set still works, uncached


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float
    similarity: float  # cosine between the item's and the label's embeddings


@dataclass(frozen=True)
class Prediction:
    """One item's zero-shot answer: the ``top`` labels, best first, or the ``error`` that stopped it."""

    source: str
    top: tuple[LabelScore, ...] = ()
    error: InputError | None = None
    modalities: tuple[str, ...] = ()  # a video's: the streams it was classified from ("image", "audio")

    @property
    def ok(self) -> bool:
        return self.error is None


class LabelCache:
    """Label -> its [D] embedding for one bundle, at most ``max_labels`` kept (least recently used dropped first).
    Thread-safe. ``embeddings`` embeds what is missing with a blocking ``embed_text`` (the library); the server
    embeds through its micro-batcher itself and uses ``get`` / ``put``. Embedding runs outside the lock, so two
    threads may embed the same new label once each."""

    def __init__(self, max_labels: int = DEFAULT_MAX_LABELS):
        self.max_labels = max_labels
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, labels: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached ones among ``labels``, each marked as just used."""
        with self._lock:
            found = {label: self._vectors[label] for label in labels if label in self._vectors}
            for label in found:
                self._vectors.move_to_end(label)
        return found

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        with self._lock:
            for label, vector in vectors.items():
                self._vectors[label] = vector
                self._vectors.move_to_end(label)
            while len(self._vectors) > self.max_labels:
                self._vectors.popitem(last=False)

    def embeddings(
        self, labels: Sequence[str], templates: Sequence[str], embed_text: Callable[[list[str]], np.ndarray]
    ) -> np.ndarray:
        """Cleaned labels -> [K, D]: per label, the normalised mean of its prompt ensemble (``embed_text``: strings
        -> [N, D]), from the cache where it holds them."""
        found = self.get(labels)
        missing = [label for label in labels if label not in found]
        if missing:
            prompts, offsets = prompts_of(missing, templates)
            fresh = dict(zip(missing, mean_embeddings(embed_text(prompts), offsets)))
            self.put(fresh)
            found.update(fresh)
        return np.stack([found[label] for label in labels])

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._vectors))

    def __len__(self) -> int:
        return len(self._vectors)


def prompts_of(labels: Sequence[str], templates: Sequence[str]) -> tuple[list[str], list[int]]:
    """-> (every label's prompts, flat), offsets [len(labels) + 1] into them."""
    groups = [label_prompts(label, templates) for label in labels]
    return [p for group in groups for p in group], np.cumsum([0] + [len(g) for g in groups]).tolist()


def mean_embeddings(vectors: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
    """Prompt embeddings [P, D] -> per label, the normalised mean of its prompts' [K, D]."""
    means = np.stack([vectors[offsets[i] : offsets[i + 1]].mean(axis=0) for i in range(len(offsets) - 1)])
    return l2_normalise(means).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


def label_scale(logit_scales: dict, modalities: Sequence[str]) -> float:
    """The logit scale for these query modalities against text labels (see the module docstring)."""
    per_modality = [np.mean([logit_scales[p] for p in LABEL_SCALE_PAIRS[m]]) for m in modalities]
    return float(np.mean(per_modality))


def rank_labels(
    logit_scales: dict,
    labels: Sequence[str],
    label_matrix: np.ndarray,
    fused: np.ndarray,
    modalities: Sequence[Sequence[str]],
    sources: Sequence[str],
    errors: Sequence[InputError | None],
    top_k: int,
) -> list[Prediction]:
    """The zero-shot arithmetic on embeddings already computed. ``label_matrix`` [K, D]: the labels' embeddings.
    ``fused`` [N, D]: each item's (normalised) embedding, NaN rows where ``errors[i]`` is set. ``modalities[i]``:
    what item i was embedded from (its logit scale: ``label_scale``). -> one ``Prediction`` per item: ``errors[i]``
    where set; else its ``top_k`` labels by ``softmax(scale * cosine)``, best first, or, where the similarities or
    probabilities are not finite, an error blamed on its first modality (NaN is never an answer)."""
    scales = [label_scale(logit_scales, m) if error is None else np.nan for m, error in zip(modalities, errors)]
    with np.errstate(invalid="ignore"):  # failed items are NaN rows; they are reported, not scored
        similarity = fused @ label_matrix.T  # [N, K]
        probabilities = softmax(np.asarray(scales, np.float32)[:, None] * similarity)
    top_k = min(top_k, len(labels))
    predictions = []
    for i, source in enumerate(sources):
        if errors[i] is not None:
            predictions.append(Prediction(source, error=errors[i]))
        elif not (np.isfinite(probabilities[i]).all() and np.isfinite(similarity[i]).all()):
            predictions.append(Prediction(source, error=non_finite(modalities[i][0], source, "probabilities")))
        else:
            order = np.argsort(-probabilities[i], kind="stable")[:top_k]
            top = tuple(LabelScore(labels[j], float(probabilities[i, j]), float(similarity[i, j])) for j in order)
            predictions.append(Prediction(source, top))
    return predictions
