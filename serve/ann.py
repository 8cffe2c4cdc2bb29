"""An approximate nearest-neighbour index beside an embeddings parquet: ``synergy embed --build-index``.

For indexes past a few million rows, where the exact scan of ``search.py`` takes longer than a query should, an
HNSW graph from usearch (Unum) answers in milliseconds. Why usearch over FAISS: one small wheel with no BLAS or
OpenMP runtime, HNSW with cosine and f16/i8 storage built in, an index that is one file and can be memory-mapped
(``view``) instead of loaded, and releases every few weeks; FAISS (``faiss-cpu``) is the reference for IVF/PQ at
billions of rows, but its PyPI wheels are a community build several times larger, and nothing here needs IVF/PQ.

``OUT.parquet`` -> ``OUT.usearch`` (keys = row numbers of the parquet, failed rows left out) and ``OUT.usearch.json``
(the parquet's row count, size and modification time when the index was built, the bundle that embedded it, and the
sha256 of the index file). A search uses the index only while that record still matches the parquet (a resumed
``synergy embed`` rewrites it) and the index file still has its hash; otherwise it says why and scans. The hash is
checked before usearch opens the file because usearch trusts it: a few flipped bytes crash the process (SIGSEGV),
which no exception handler can turn into a message. Hashing reads the file once per search (about 1 GB/s).

A query's hits are then read from the parquet by row: only the row groups that hold them, only the columns needed
(``read_rows``), not whole columns.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import require

DTYPES = ("f32", "f16", "i8")


def index_paths(parquet: str | Path) -> tuple[Path, Path]:
    parquet = Path(parquet)
    return parquet.with_suffix(".usearch"), parquet.with_suffix(".usearch.json")


def fingerprint(parquet: Path, rows: int) -> dict:
    stat = parquet.stat()
    return {"rows": rows, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def build_index(parquet: str | Path, dtype: str = "f16", block_rows: int = 65_536) -> Path:
    """Index every embedded row of ``parquet`` (cosine). -> the index file. f16 halves the memory of f32 with a
    recall loss too small to see at CLIP dimensions; i8 quarters it."""
    usearch = require("usearch.index", "index")
    pq = require("pyarrow.parquet", "serve")
    parquet = Path(parquet)
    table_file = pq.ParquetFile(parquet)
    dim = table_file.schema_arrow.field("embedding").type.list_size
    index = usearch.Index(ndim=dim, metric="cos", dtype=dtype)
    row = 0
    for batch in table_file.iter_batches(batch_size=block_rows, columns=["embedding"]):
        embedding = batch.column("embedding")
        valid = embedding.is_valid().to_numpy(zero_copy_only=False)
        start = embedding.offset * dim
        vectors = embedding.values.to_numpy(zero_copy_only=False)[start : start + len(embedding) * dim]
        keys = np.arange(row, row + len(embedding), dtype=np.uint64)
        if valid.any():
            index.add(keys[valid], np.ascontiguousarray(vectors.reshape(-1, dim)[valid], np.float32))
        row += len(embedding)
    target, record = index_paths(parquet)
    temporary = target.with_name(f".{target.name}.tmp")
    index.save(str(temporary))
    os.replace(temporary, target)
    from .corpus import BUNDLE_KEY  # the parquet metadata's key for the bundle that embedded it

    bundle = (table_file.schema_arrow.metadata or {}).get(BUNDLE_KEY, b"").decode() or None
    facts = {"dtype": dtype, "vectors": len(index), "bundle_sha256": bundle, "index_sha256": file_sha256(target)}
    record.write_text(json.dumps({**fingerprint(parquet, row), **facts}) + "\n")
    return target


def open_index(parquet: str | Path):
    """The index beside ``parquet`` (memory-mapped), or (None, why not) when there is none, it is stale, or it is
    not the file that was built (its sha256 differs: damaged or replaced)."""
    target, record = index_paths(parquet)
    if not target.is_file() or not record.is_file():
        return None, None
    pq = require("pyarrow.parquet", "serve")
    rebuild = "rebuild it with synergy embed --build-index (scanning instead)"
    try:
        built = json.loads(record.read_text())
        if not isinstance(built, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        return None, f"{record} cannot be read ({error}); {rebuild}"
    now = fingerprint(Path(parquet), pq.ParquetFile(parquet).metadata.num_rows)
    if any(built.get(key) != value for key, value in now.items()):
        return None, f"{target} is older than {parquet}; {rebuild}"
    if built.get("index_sha256") != file_sha256(target):
        return None, f"{target} is damaged (its sha256 is not the one recorded when it was built); {rebuild}"
    usearch = require("usearch.index", "index")
    try:
        return usearch.Index.restore(str(target), view=True), None
    except Exception as error:  # usearch raises RuntimeError / ValueError for a file it cannot read
        return None, f"{target} cannot be opened ({error}); {rebuild}"


def read_rows(parquet: str | Path, rows: Sequence[int], columns: Sequence[str]):
    """The parquet's ``rows`` (in that order) of ``columns`` only -> a pyarrow Table, reading only the row groups
    that hold them."""
    pq = require("pyarrow.parquet", "serve")
    pa = require("pyarrow", "serve")
    table_file = pq.ParquetFile(parquet)
    sizes = [table_file.metadata.row_group(g).num_rows for g in range(table_file.metadata.num_row_groups)]
    starts = np.cumsum([0, *sizes]).tolist()  # [G + 1]
    owners = [bisect.bisect_right(starts, row) - 1 for row in rows]
    groups = sorted(set(owners))
    base, at = {}, 0
    for group in groups:  # where each group's rows begin in the table of the groups read
        base[group] = at
        at += sizes[group]
    table = table_file.read_row_groups(groups, columns=list(columns))
    return table.take(pa.array([base[g] + row - starts[g] for g, row in zip(owners, rows)], pa.int64()))


def search_approximate(index, parquet: str | Path, query: np.ndarray, top_k: int, modality: str | None):
    """-> [(row, cosine)] best first, or None when a modality filter leaves fewer than ``top_k`` candidates (the
    caller then scans exactly)."""
    fetch = top_k if modality is None else top_k * 8  # over-fetch, then keep the rows of the modality
    matches = index.search(np.asarray(query, np.float32), min(fetch, len(index)))
    rows, distances = np.asarray(matches.keys, np.int64), np.asarray(matches.distances, np.float64)
    if modality is not None:
        modalities = read_rows(parquet, rows.tolist(), ["modality"]).column("modality").to_pylist()
        keep = np.array([m == modality for m in modalities], bool)
        rows, distances = rows[keep], distances[keep]
        if len(rows) < top_k:
            return None
    return [(int(r), float(1.0 - d)) for r, d in zip(rows[:top_k], distances[:top_k])]  # cos distance = 1 - cosine
