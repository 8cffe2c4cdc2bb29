"""``synergy search``: exact cosine search of an embeddings parquet (from ``synergy embed``) by text, audio or image.

The index is read in blocks of ``block_rows`` rows (pyarrow record batches), each block scored against the query
with the runtime's ``cosine_top_k`` and merged into the running top k, so memory stays O(block) however many rows the
file has: a few million rows of 512-d vectors take seconds on one core, with no index to build or keep in sync. Rows
that failed (null embedding) are skipped; ``modality`` keeps only rows of one modality.

The query must be embedded by the bundle that embedded the file (recorded in its metadata by ``synergy embed``):
another bundle's vectors live in another space, so a mismatch is refused naming both. A file that cannot be read
is an error naming it (exit 2), never a traceback.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synergy.runtime import InferUsageError, Runtime
from synergy.runtime.search import cosine_top_k, l2_normalise

from . import require
from .corpus import bundle_identity, check_bundle, first_line


@dataclass(frozen=True)
class Hit:
    path: str
    modality: str
    score: float  # cosine similarity


def search_index(
    index: str | Path, query: np.ndarray, top_k: int = 10, modality: str | None = None, block_rows: int = 262_144
) -> list[Hit]:
    """query [D] -> the ``top_k`` rows of ``index`` by cosine similarity, best first."""
    if top_k < 1:
        raise InferUsageError(f"--top-k must be >= 1, got {top_k}")
    path = Path(index)
    if not path.is_file():
        raise InferUsageError(f"--index {index}: no such file; write one with `synergy embed INPUTS --out {index}`")
    table_file = open_parquet(path)
    query = l2_normalise(np.asarray(query, np.float32).reshape(1, -1))  # [1, D]
    best_scores = np.zeros(0, np.float32)
    best_rows: list[tuple[str, str]] = []
    for batch in read_batches(path, table_file, block_rows):
        embedding = batch.column("embedding")
        keep = embedding.is_valid().to_numpy(zero_copy_only=False)
        modalities = batch.column("modality").to_pylist()
        if modality:
            keep &= np.array([m == modality for m in modalities], bool)
        if not keep.any():
            continue
        dim = embedding.type.list_size
        if dim != query.shape[1]:
            raise InferUsageError(
                f"--index {index}: {dim}-d embeddings, but the query is {query.shape[1]}-d; "
                "use the bundle that wrote the index"
            )
        # .values keeps the slots of null rows (flatten() would drop them), so row i stays row i
        start = embedding.offset * dim
        vectors = embedding.values.to_numpy(zero_copy_only=False)[start : start + len(embedding) * dim].reshape(-1, dim)
        rows = np.flatnonzero(keep)
        indices, scores = cosine_top_k(query, l2_normalise(vectors[rows]), top_k)  # [1, k']
        paths = batch.column("path").to_pylist()
        best_rows += [(paths[rows[i]], modalities[rows[i]]) for i in indices[0]]
        best_scores = np.concatenate([best_scores, scores[0]])
        order = np.argsort(-best_scores, kind="stable")[:top_k]
        best_scores, best_rows = best_scores[order], [best_rows[i] for i in order]
    return [Hit(p, m, float(s)) for (p, m), s in zip(best_rows, best_scores)]


def open_parquet(path: Path):
    pq = require("pyarrow.parquet", "serve")
    try:
        return pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
        raise InferUsageError(f"--index {path}: not a parquet file, or a damaged one ({first_line(error)})") from error


def read_batches(path: Path, table_file, block_rows: int):
    """The file's record batches; damage found while reading them is an ``InferUsageError`` naming the file."""
    batches = table_file.iter_batches(batch_size=block_rows, columns=["path", "modality", "embedding"])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as error:  # ArrowInvalid, OSError, ... from a damaged page
            raise InferUsageError(
                f"--index {path}: damaged, it cannot be read ({first_line(error)}); write it again with synergy embed"
            ) from error
        yield batch


def run(
    index: str,
    bundle: str,
    text: str | None,
    audio: str | None,
    image: str | None,
    top_k: int,
    modality: str | None,
    as_json: bool,
    threads: int | None = None,
    exact: bool = False,
) -> int:
    """The command: embed the query, search (the approximate index beside ``index`` when there is a fresh one and
    not ``exact``), print a table or JSON lines. -> exit code (1: the query failed)."""
    given = {m: v for m, v in (("text", text), ("audio", audio), ("image", image)) if v is not None}
    if len(given) != 1:
        raise InferUsageError("give exactly one query: --text, --audio or --image")
    ((query_modality, value),) = given.items()
    if not Path(index).is_file():
        raise InferUsageError(f"--index {index}: no such file; write one with `synergy embed INPUTS --out {index}`")
    runtime = Runtime.open(bundle, threads=threads)
    metadata = open_parquet(Path(index)).schema_arrow.metadata
    check_bundle(Path(index), metadata, bundle_identity(runtime.bundle), bundle, "search it with that --bundle")
    result = runtime.embed_batch(query_modality, [value])
    if result.errors[0] is not None:
        print(f"synergy search: the query failed: {result.errors[0]}", file=sys.stderr)
        return 1
    hits = None if exact else approximate_hits(index, result.vectors[0], top_k, modality)
    if hits is None:
        hits = search_index(index, result.vectors[0], top_k, modality)
    if as_json:
        for rank, hit in enumerate(hits, 1):
            print(json.dumps({"rank": rank, "path": hit.path, "modality": hit.modality, "score": round(hit.score, 6)}))
    else:
        for rank, hit in enumerate(hits, 1):
            print(f"{rank:>3}  {hit.score:7.4f}  {hit.modality:<5}  {hit.path}")
    return 0


def approximate_hits(index: str, query: np.ndarray, top_k: int, modality: str | None) -> list[Hit] | None:
    """Hits from the usearch index beside ``index`` (``synergy embed --build-index``), or None: scan instead."""
    from .ann import open_index, read_rows, search_approximate

    target = Path(index).with_suffix(".usearch")
    if not target.is_file():
        return None
    ann, stale = open_index(index)
    if ann is None:
        print(f"synergy search: {stale}", file=sys.stderr)
        return None
    try:
        found = search_approximate(ann, index, query, top_k, modality)
        if found is None:
            return None
        table = read_rows(index, [row for row, _ in found], ["path", "modality"])
    except Exception as error:  # ArrowInvalid, OSError, ... from a damaged page of the hits' row groups
        raise InferUsageError(
            f"--index {index}: damaged, it cannot be read ({first_line(error)}); write it again with synergy embed"
        ) from error
    print(f"synergy search: approximate ({target.name}); --exact scans every row", file=sys.stderr)
    return [
        Hit(path, kind, score)
        for path, kind, (_, score) in zip(table.column("path").to_pylist(), table.column("modality").to_pylist(), found)
    ]
