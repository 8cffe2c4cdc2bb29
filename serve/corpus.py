"""``synergy embed``: a corpus -> one parquet file of embeddings, resumable, locally or on Ray Data.

INPUTS are manifest CSVs (their ``img_path``, ``wav_path`` and ``video_path`` cells, relative to the CSV), folders
(searched recursively for audio, image and video files) and globs. The output has one row per (file, modality),
sorted by path (a video's embedding is the runtime's fused one: its pooled frames and its soundtrack):

    path: string, modality: string ("audio" | "image" | "video" | "unknown"), embedding: fixed_size_list<float32>[D]
    (null when the item failed), error_type: string, error: string (null when it was embedded)

Resumable: while it runs, finished chunks are written to ``OUT.parts/part-NNNNNN.parquet`` (each written to a
temporary name and renamed, so a kill leaves whole parts only); a new run with the same ``--out`` skips every item
already embedded in ``OUT`` or its parts, retries the failed ones, and at the end merges everything into ``OUT``
(again through a rename) and removes the parts. A bad file is a row with its error, never the end of the job.
``build_index`` then writes an approximate index beside ``OUT`` (see ``ann.py``).

The files know their model: every part and ``OUT`` carry the bundle's identity (the sha256 of its manifest.json,
which lists every graph's sha256) in the parquet metadata, and resuming with another bundle, or searching with one,
is refused naming both (two bundles of one preset give vectors of the same size, so nothing else would notice the
mix). A part that cannot be read (a disk fault, a copy cut short) is set aside as ``part-N.parquet.bad`` with a
message and its items are embedded again; an ``OUT`` that cannot be read is an error naming it.

Folders: every file with an audio, image or video extension is an item, including ones that are not regular files
(a FIFO, a dangling link, a link loop), which then fail with the decoder's message instead of vanishing.

Engines: ``local`` runs the runtime in this process, a chunk at a time; ``ray`` runs the same ``embed_rows`` in a
Ray Data ``map_batches`` over an actor pool (one ``Runtime`` per actor, opened once) on the cluster that
``ray.init(address)`` joins, and streams the results back here into the same writer, so both engines write the same
rows the same way.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synergy.runtime import InferUsageError, Runtime
from synergy.runtime.audio import AUDIO_EXTENSIONS
from synergy.runtime.image import IMAGE_EXTENSIONS
from synergy.runtime.manifest import MANIFEST_NAME
from synergy.runtime.video import VIDEO_EXTENSIONS

from . import require

MANIFEST_COLUMNS = {"wav_path": "audio", "img_path": "image", "video_path": "video"}
MEDIA = ("audio", "image", "video")
COLUMNS = ("path", "modality", "embedding", "error_type", "error")
BUNDLE_KEY, BUNDLE_PATH_KEY = b"synergy.bundle_sha256", b"synergy.bundle"  # parquet metadata


def bundle_identity(bundle: str | Path) -> str:
    """The sha256 of a bundle's manifest.json: it lists every graph's sha256, so it names the weights."""
    return hashlib.sha256((Path(bundle) / MANIFEST_NAME).read_bytes()).hexdigest()


def written_by(path: Path, metadata: dict | None) -> tuple[str, str] | None:
    """(identity, bundle path) recorded in a parquet's metadata, or None for a file written before they were."""
    metadata = metadata or {}
    if BUNDLE_KEY not in metadata:
        return None
    return metadata[BUNDLE_KEY].decode(), metadata.get(BUNDLE_PATH_KEY, b"?").decode()


def check_bundle(path: Path, metadata: dict | None, identity: str, bundle: str | Path, what: str) -> None:
    """``InferUsageError`` (exit 2) naming both bundles when ``path`` was written by another one."""
    recorded = written_by(path, metadata)
    if recorded is not None and recorded[0] != identity:
        raise InferUsageError(
            f"{path} was written by the bundle {recorded[1]} (manifest sha256 {recorded[0][:12]}), not by {bundle} "
            f"({identity[:12]}); {what}"
        )


@dataclass(frozen=True)
class Item:
    path: str
    modality: str  # "audio" | "image" | "video"; anything else fails with ``problem``
    problem: str | None = None


def modality_of(path: str) -> Item:
    suffix = Path(path).suffix.lower()
    if suffix in AUDIO_EXTENSIONS:
        return Item(path, "audio")
    if suffix in IMAGE_EXTENSIONS:
        return Item(path, "image")
    if suffix in VIDEO_EXTENSIONS:
        return Item(path, "video")
    return Item(path, "unknown", f"not an audio, image or video file (extension {suffix or 'none'!r})")


def list_items(inputs: Sequence[str]) -> list[Item]:
    """INPUTS -> items, in order, each (path, modality) once. A folder or glob that matches nothing is an item
    that fails (it is reported in the output, like a bad file)."""
    items: list[Item] = []
    for given in inputs:
        path = Path(given)
        if path.is_file() and path.suffix.lower() == ".csv":
            items += manifest_items(path)
        elif path.is_dir():  # not is_file(): a FIFO or a broken link named like media is an item that fails
            found = [modality_of(str(p)) for p in sorted(path.rglob("*")) if not p.is_dir()]
            found = [item for item in found if item.problem is None]
            items += found or [Item(given, "unknown", "folder has no audio, image or video files")]
        elif glob.has_magic(given) and not path.exists():
            found = sorted(f for f in glob.glob(given, recursive=True) if not Path(f).is_dir())
            items += [modality_of(f) for f in found] or [Item(given, "unknown", "no files match this pattern")]
        else:
            items.append(modality_of(given))  # a missing file fails when it is decoded, with its own message
    seen: set[tuple[str, str]] = set()
    unique = []
    for item in items:
        if (item.path, item.modality) not in seen:
            seen.add((item.path, item.modality))
            unique.append(item)
    return unique


def manifest_items(csv_path: Path) -> list[Item]:
    """A manifest's files: its ``wav_path``, ``img_path`` and ``video_path`` cells, relative to the CSV's folder."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InferUsageError(f"{csv_path}: cannot read the manifest: {error}") from error
    if rows and not set(MANIFEST_COLUMNS) & set(rows[0]):
        columns = ", ".join(MANIFEST_COLUMNS)
        raise InferUsageError(f"{csv_path}: a manifest needs one of the columns {columns}; found {list(rows[0])}")
    items = []
    for row in rows:
        for column, modality in MANIFEST_COLUMNS.items():
            cell = (row.get(column) or "").strip()
            if cell:
                items.append(Item(str(csv_path.parent / cell), modality))
    return items


# ------------------------------------------------------------------------------------------------ embedding


def embed_rows(
    runtime: Runtime,
    paths: Sequence[str],
    modalities: Sequence[str],
    problems: Sequence[str | None] | None = None,
    sources: Sequence[str] | None = None,
) -> dict[str, list]:
    """One chunk -> columns {path, modality, embedding ([D] float32 or None), error_type, error}, in input order.
    ``problems``: why an item that is not audio or an image fails (``Item.problem``). ``sources``: where to read each
    item when that is not its ``path`` as given (the Ray engine's absolute paths). Shared by the local engine and the
    Ray actors."""
    rows = {name: [None] * len(paths) for name in COLUMNS}
    rows["path"], rows["modality"] = list(paths), list(modalities)
    sources = list(sources or paths)
    for modality in MEDIA:
        where = [i for i, m in enumerate(modalities) if m == modality]
        if not where:
            continue
        if modality == "video":  # frames pooled and the soundtrack, fused: one vector in the shared space
            result = runtime.embed_video_batch([sources[i] for i in where])
            vectors = result.fused
        else:
            result = runtime.embed_batch(modality, [sources[i] for i in where])
            vectors = result.vectors
        for i, vector, error in zip(where, vectors, result.errors):
            if error is None:
                rows["embedding"][i] = vector
            else:
                rows["error_type"][i], rows["error"][i] = type(error).__name__, str(error)
    for i, modality in enumerate(modalities):
        if modality not in MEDIA:
            problem = (problems[i] if problems else None) or "not an audio, image or video file"
            rows["error_type"][i], rows["error"][i] = "UnsupportedInput", f"{paths[i]}: {problem}"
    return rows


class RayEmbedder:
    """A Ray Data actor: opens the bundle once, then embeds batches (numpy dicts) with ``embed_rows``."""

    def __init__(self, bundle: str, threads: int | None, batch_size: int):
        self.runtime = Runtime.open(bundle, threads=threads, batch_size=batch_size)

    def __call__(self, batch: dict) -> dict:
        problems = [str(p) if p else None for p in batch["problem"]]
        paths, sources = [str(p) for p in batch["path"]], [str(p) for p in batch["source"]]
        rows = embed_rows(self.runtime, paths, [str(m) for m in batch["modality"]], problems, sources)
        dim = self.runtime.manifest.embed_dim
        vectors = np.stack([v if v is not None else np.full(dim, np.nan, np.float32) for v in rows["embedding"]])
        return {
            "path": np.array(rows["path"], dtype=object),
            "modality": np.array(rows["modality"], dtype=object),
            "embedding": vectors.astype(np.float32),  # [n, D]; NaN rows where error is set (null in parquet)
            "error_type": np.array([e or "" for e in rows["error_type"]], dtype=object),
            "error": np.array([e or "" for e in rows["error"]], dtype=object),
        }


# --------------------------------------------------------------------------------------------------- output


class DamagedParquet(InferUsageError):
    """A parquet file of this job cannot be read."""


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class ParquetParts:
    """Chunks -> ``OUT.parts/part-N.parquet`` (atomic renames) -> one sorted ``OUT`` on ``finish``. Every file
    carries the bundle's identity (``bundle`` path and ``identity``: ``bundle_identity``) in its metadata."""

    ROW_GROUP = 65_536  # rows per row group of OUT: the approximate search reads only the groups of its hits

    def __init__(self, out: Path, dim: int, bundle: str | Path = "", identity: str = ""):
        self.pa = require("pyarrow", "serve")
        self.pq = require("pyarrow.parquet", "serve")
        self.out = out
        self.parts = out.with_name(out.name + ".parts")
        self.dim = dim
        self.bundle, self.identity = str(bundle), identity
        metadata = {BUNDLE_KEY: identity.encode(), BUNDLE_PATH_KEY: str(bundle).encode()} if identity else None
        self.schema = self.pa.schema(
            [
                ("path", self.pa.string()),
                ("modality", self.pa.string()),
                ("embedding", self.pa.list_(self.pa.float32(), dim)),
                ("error_type", self.pa.string()),
                ("error", self.pa.string()),
            ],
            metadata=metadata,
        )

    def existing(self) -> list:
        """The tables of an earlier run: ``OUT`` and its parts (a part from a killed run is whole or absent; one that
        cannot be read is set aside as ``.bad`` and its items are redone)."""
        tables = []
        if self.out.is_file():
            tables.append(self._read(self.out))
        if self.parts.is_dir():
            for part in sorted(self.parts.glob("part-*.parquet")):
                try:
                    tables.append(self._read(part))
                except DamagedParquet as error:
                    part.rename(part.with_name(part.name + ".bad"))
                    print(
                        f"synergy embed: {error}; set aside as {part.name}.bad, its items are embedded again",
                        file=sys.stderr,
                    )
        return tables

    def _read(self, path: Path):
        try:
            table = self.pq.read_table(path)
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise DamagedParquet(f"{path}: cannot be read as parquet ({first_line(error)})") from error
        if self.identity:
            check_bundle(path, table.schema.metadata, self.identity, self.bundle, "use that bundle or another --out")
        if table.schema.field("embedding").type != self.schema.field("embedding").type:
            raise InferUsageError(
                f"{path}: its embeddings are {table.schema.field('embedding').type}, this bundle gives "
                f"{self.dim}-d float32 vectors; use another --out or the bundle that wrote it"
            )
        return table.select(list(COLUMNS)).cast(self.schema)

    def done(self) -> set[tuple[str, str]]:
        """(path, modality) of every item already embedded without error."""
        keys = set()
        for table in self.existing():
            ok = table.column("error").is_null().to_pylist()
            for path, modality, good in zip(table.column("path").to_pylist(), table.column("modality").to_pylist(), ok):
                if good:
                    keys.add((path, modality))
        return keys

    def write(self, rows: dict[str, list]) -> None:
        vectors = rows["embedding"]
        flat = [v if v is not None else np.zeros(self.dim, np.float32) for v in vectors]
        values = self.pa.array(np.concatenate(flat).astype(np.float32) if flat else np.zeros(0, np.float32))
        mask = self.pa.array([v is None for v in vectors], self.pa.bool_())  # a failed item: a null embedding
        embedding = self.pa.FixedSizeListArray.from_arrays(values, self.dim, mask=mask)
        table = self.pa.table(
            {
                "path": self.pa.array(rows["path"], self.pa.string()),
                "modality": self.pa.array(rows["modality"], self.pa.string()),
                "embedding": embedding,
                "error_type": self.pa.array(rows["error_type"], self.pa.string()),
                "error": self.pa.array(rows["error"], self.pa.string()),
            },
            schema=self.schema,
        )
        self.parts.mkdir(parents=True, exist_ok=True)
        number = len(list(self.parts.glob("part-*.parquet*")))  # .bad ones keep their numbers
        target = self.parts / f"part-{number:06d}.parquet"
        temporary = self.parts / f".{target.name}.tmp"
        self.pq.write_table(table, temporary)
        os.replace(temporary, target)

    def finish(self) -> tuple[int, int]:
        """Merge ``OUT`` and the parts into ``OUT`` (the last row of each item wins), sorted by (path, modality).
        -> (rows, failed rows)."""
        tables = self.existing()
        table = self.pa.concat_tables(tables) if tables else self.schema.empty_table()
        keys = list(zip(table.column("path").to_pylist(), table.column("modality").to_pylist()))
        last = {key: i for i, key in enumerate(keys)}
        order = sorted(last, key=lambda key: key)
        table = table.take(self.pa.array([last[key] for key in order], self.pa.int64()))
        temporary = self.out.with_name(f".{self.out.name}.tmp")
        self.pq.write_table(
            table.replace_schema_metadata(self.schema.metadata), temporary, row_group_size=self.ROW_GROUP
        )
        os.replace(temporary, self.out)
        for bad in self.parts.glob("part-*.parquet.bad"):  # kept beside OUT for a look, out of the parts' way
            os.replace(bad, self.out.with_name(f"{self.out.name}.{bad.name}"))
        shutil.rmtree(self.parts, ignore_errors=True)
        return table.num_rows, table.num_rows - table.column("error").null_count


def chunks(items: Sequence[Item], size: int) -> Iterable[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def progress(total: int, engine: str):
    tqdm = require("tqdm", "serve").tqdm
    return tqdm(total=total, unit="file", desc=f"synergy embed ({engine})", file=sys.stderr, dynamic_ncols=True)


def embed_corpus(
    inputs: Sequence[str],
    bundle: str,
    out: str,
    *,
    engine: str = "local",
    batch_size: int = 32,
    chunk_size: int = 256,
    threads: int | None = None,
    workers: int = 2,
    ray_address: str | None = None,
    build_index: bool = False,
) -> dict:
    """Run the job; -> a summary {"items", "skipped", "embedded", "failed", "rows", "seconds", "out"}. Raises
    ``InferUsageError`` (exit 2) when nothing can run: no inputs, an unusable bundle, an unreadable --out."""
    started = time.perf_counter()
    items = list_items(inputs)
    if not items:
        raise InferUsageError("no inputs: give manifest CSVs, folders or globs of audio / image / video files")
    out_path = Path(out)
    if out_path.is_dir():
        raise InferUsageError(f"--out {out} is a folder; give the parquet file to write, e.g. {out}/embeddings.parquet")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    runtime = Runtime.open(bundle, threads=threads, batch_size=batch_size, verify=True)
    writer = ParquetParts(out_path, runtime.manifest.embed_dim, bundle, bundle_identity(runtime.bundle))
    try:
        done = writer.done()
    except DamagedParquet as error:
        raise InferUsageError(f"{error}; move it away to start over, or give another --out") from error
    todo = [item for item in items if (item.path, item.modality) not in done]
    bar = progress(len(todo), engine)
    failed = 0
    if engine == "local":
        for chunk in chunks(todo, chunk_size):
            rows = embed_rows(runtime, [i.path for i in chunk], [i.modality for i in chunk], [i.problem for i in chunk])
            writer.write(rows)
            failed += sum(e is not None for e in rows["error"])
            bar.update(len(chunk))
            bar.set_postfix(failed=failed)
    elif engine == "ray":
        failed = run_ray(todo, bundle, writer, bar, batch_size, chunk_size, threads, workers, ray_address)
    else:
        raise InferUsageError(f"engine {engine!r} is not one of local, ray")
    bar.close()
    runtime.close()
    rows, failed_rows = writer.finish()
    if build_index:
        from .ann import build_index as build

        build(out_path)
    return {
        "items": len(items),
        "skipped": len(items) - len(todo),
        "embedded": len(todo) - failed,
        "failed": failed_rows,
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "out": str(out_path),
    }


def ray_items(todo: Sequence[Item]) -> list[dict]:
    """What the Ray engine ships: each item's path as given (its row) and as an absolute path (what a worker reads,
    whatever its working folder is, on whichever machine of a cluster that shares the files)."""
    return [
        {"path": i.path, "source": os.path.abspath(i.path), "modality": i.modality, "problem": i.problem or ""}
        for i in todo
    ]


def run_ray(todo, bundle, writer, bar, batch_size, chunk_size, threads, workers, address) -> int:
    """Ray Data: from_items -> map_batches(RayEmbedder, one actor per worker) -> stream the rows back to ``writer``."""
    ray = require("ray", "ray")
    require("ray.data", "ray")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a local instance: the actors, plus one CPU for Ray Data's own tasks
            ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False)
    if not todo:
        return 0
    dataset = ray.data.from_items(ray_items(todo))
    embedded = dataset.map_batches(
        RayEmbedder,
        fn_constructor_kwargs={"bundle": str(Path(bundle).resolve()), "threads": threads, "batch_size": batch_size},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=workers,
        num_cpus=1,
    )
    failed = 0
    for batch in embedded.iter_batches(batch_size=chunk_size, batch_format="numpy"):
        errors = [e or None for e in batch["error"]]
        rows = {
            "path": [str(p) for p in batch["path"]],
            "modality": [str(m) for m in batch["modality"]],
            "embedding": [None if e else np.asarray(v, np.float32) for v, e in zip(batch["embedding"], errors)],
            "error_type": [e or None for e in batch["error_type"]],
            "error": errors,
        }
        writer.write(rows)
        failed += sum(e is not None for e in errors)
        bar.update(len(rows["path"]))
        bar.set_postfix(failed=failed)
    return failed
