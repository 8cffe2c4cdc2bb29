"""Vectors: L2 normalisation, fusing modalities, and exact cosine nearest neighbours over a corpus in blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InferUsageError


@dataclass(frozen=True)
class SearchHit:
    index: int  # row of the corpus
    score: float  # cosine similarity


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def fuse_embeddings(per_modality: Sequence[np.ndarray]) -> np.ndarray:
    """Several modalities' embeddings of the same items, each [N, D] -> the normalised mean [N, D] (NaN rows stay
    NaN: an item that failed in one modality fails)."""
    with np.errstate(invalid="ignore"):
        return l2_normalise(np.mean(per_modality, axis=0))


def cosine_top_k(queries: np.ndarray, corpus: np.ndarray, k: int, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D], corpus [N, D] (normalised) -> (indices [Q, k'], scores [Q, k']), k' = min(k, N), best
    first. The corpus is scanned in blocks so that memory stays O(Q * block)."""
    k = min(k, corpus.shape[0])
    best_scores = np.full((queries.shape[0], 0), -np.inf, np.float32)
    best_index = np.zeros((queries.shape[0], 0), np.int64)
    for start in range(0, corpus.shape[0], block):
        scores = queries @ corpus[start : start + block].T  # [Q, b]
        take = min(k, scores.shape[1])
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
        best_index = np.concatenate([best_index, part + start], axis=1)
        if best_scores.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_scores, best_index = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_index, keep, 1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_index, order, 1), np.take_along_axis(best_scores, order, 1)


def nearest(queries: np.ndarray, corpus_embeddings: np.ndarray, top_k: int) -> list[list[SearchHit]]:
    """Embeddings [D] or [Q, D] against a corpus [N, D] (either unnormalised) -> per query, up to ``top_k`` hits by
    cosine similarity, best first."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    corpus = np.asarray(corpus_embeddings, dtype=np.float32)
    if corpus.ndim != 2 or queries.ndim != 2 or corpus.shape[1] != queries.shape[1]:
        shapes = f"{queries.shape} and {corpus.shape}"
        raise InferUsageError(f"search needs queries [Q, D] and a corpus [N, D] with the same D; got {shapes}")
    if top_k < 1:
        raise InferUsageError(f"top_k must be >= 1, got {top_k}")
    if corpus.shape[0] == 0:
        return [[] for _ in range(queries.shape[0])]
    indices, scores = cosine_top_k(l2_normalise(queries), l2_normalise(corpus), top_k)
    return [[SearchHit(int(i), float(s)) for i, s in zip(row_i, row_s)] for row_i, row_s in zip(indices, scores)]
