"""Corpus files under rare paths: they know the bundle that wrote them, damage is a message (never a crash or a
traceback), odd folder entries are rows, the Ray engine ships paths a worker anywhere can read, and the approximate
search reads only the row groups of its hits."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="synergy-clip[serve] is not installed (pyarrow)")
pq = pytest.importorskip("pyarrow.parquet", reason="synergy-clip[serve] is not installed (pyarrow)")


def synergy(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synergy.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from synergy.train.datasets.synth import synthesize

    folder = tmp_path_factory.mktemp("corpus") / "synth"
    synthesize(folder, seed=0, train_per_class=1, val_per_class=1, heldout_per_class=0)
    return folder


@pytest.fixture(scope="module")
def other_bundle(bundle, tmp_path_factory) -> Path:
    """Another bundle of the same size: the same graphs under a different manifest (another logit scale)."""
    other = tmp_path_factory.mktemp("other") / "tiny-b"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["logit_scales"]["image_text"] += 1.0
    (other / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return other


# ------------------------------------------------------------------------------------- 6. files know their model


def test_resuming_or_searching_with_another_bundle_is_refused_naming_both(corpus, bundle, other_bundle, tmp_path):
    out = tmp_path / "val.parquet"
    assert synergy("embed", str(corpus / "val.csv"), "--bundle", str(bundle), "--out", str(out)).returncode == 0
    identity = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert pq.read_schema(out).metadata[b"synergy.bundle_sha256"].decode() == identity

    resumed = synergy(
        "embed", str(corpus / "val.csv"), str(corpus / "images"), "--bundle", str(other_bundle), "--out", str(out)
    )
    assert resumed.returncode == 2, resumed.stderr
    assert f"written by the bundle {bundle}" in resumed.stderr and str(other_bundle) in resumed.stderr
    assert "Traceback" not in resumed.stderr

    found = synergy("search", "--index", str(out), "--bundle", str(other_bundle), "--text", "a red circle")
    assert (
        found.returncode == 2
        and f"written by the bundle {bundle}" in found.stderr
        and str(other_bundle) in found.stderr
    )
    assert synergy("search", "--index", str(out), "--bundle", str(bundle), "--text", "a red circle").returncode == 0


# ------------------------------------------------------------------------------------------------- 7. damage


def test_a_damaged_index_is_not_opened_and_the_search_scans_instead(corpus, bundle, tmp_path):
    pytest.importorskip("usearch", reason="usearch is not installed (synergy-clip[index])")
    out = tmp_path / "val.parquet"
    done = synergy("embed", str(corpus / "val.csv"), "--bundle", str(bundle), "--out", str(out), "--build-index")
    assert done.returncode == 0, done.stderr
    index = out.with_suffix(".usearch")
    data = bytearray(index.read_bytes())
    for offset in range(len(data) // 2, len(data), 7):  # flipped bytes in the graph: usearch crashes on them (SIGSEGV)
        data[offset] ^= 0xFF
    index.write_bytes(bytes(data))
    query = str(corpus / "audio/val/blue_star_0000.wav")
    found = synergy("search", "--index", str(out), "--bundle", str(bundle), "--audio", query, "--json")
    assert found.returncode == 0, (found.returncode, found.stderr[-2000:])  # not -11 (SIGSEGV)
    assert f"{index} is damaged" in found.stderr and "scanning instead" in found.stderr
    exact = synergy("search", "--index", str(out), "--bundle", str(bundle), "--audio", query, "--json", "--exact")
    assert found.stdout == exact.stdout and json.loads(found.stdout.splitlines()[0])["path"] == query


def test_a_damaged_parquet_is_an_error_naming_it(corpus, bundle, tmp_path):
    out = tmp_path / "val.parquet"
    assert synergy("embed", str(corpus / "val.csv"), "--bundle", str(bundle), "--out", str(out)).returncode == 0
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2] + b"\0" * (len(data) - len(data) // 2))  # a copy cut short
    for command in (
        ("search", "--index", str(out), "--bundle", str(bundle), "--text", "a red circle"),
        ("embed", str(corpus / "val.csv"), "--bundle", str(bundle), "--out", str(out)),
    ):
        done = synergy(*command)
        assert done.returncode == 2 and str(out) in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_damaged_part_is_set_aside_and_its_items_are_redone(corpus, bundle, library, tmp_path):
    from synergy.serve.corpus import ParquetParts, bundle_identity, embed_corpus, embed_rows

    clips = sorted(str(p) for p in (corpus / "audio" / "val").glob("*.wav"))[:4]
    out = tmp_path / "clips.parquet"
    writer = ParquetParts(out, library.manifest.embed_dim, bundle, bundle_identity(bundle))
    writer.write(embed_rows(library, clips[:2], ["audio"] * 2))  # a killed run's two parts
    writer.write(embed_rows(library, clips[2:], ["audio"] * 2))
    first = writer.parts / "part-000000.parquet"
    first.write_bytes(first.read_bytes()[:100])  # cut short by a full disk
    summary = embed_corpus(clips, str(bundle), str(out))
    assert (summary["skipped"], summary["embedded"], summary["rows"]) == (2, 2, 4)
    assert out.with_name("clips.parquet.part-000000.parquet.bad").is_file()  # kept for a look
    rows = pq.read_table(out).to_pylist()
    np.testing.assert_allclose([r["embedding"] for r in rows], library.embed_batch("audio", clips).vectors, atol=2e-6)


# ----------------------------------------------------------------------------------------- 8. odd folder entries


def test_fifos_and_broken_links_in_a_folder_are_rows_with_their_error(corpus, bundle, tmp_path):
    from synergy.serve.corpus import embed_corpus

    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(corpus / "audio/val/blue_star_0000.wav", folder / "good.wav")
    os.mkfifo(folder / "pipe.wav")  # reading it would block forever
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    (folder / "loop.wav").symlink_to(folder / "loop.wav")
    (folder / "notes").symlink_to(folder / "nowhere")  # not named like media: skipped like any other non-media file
    out = tmp_path / "odd.parquet"
    summary = embed_corpus([str(folder)], str(bundle), str(out))
    assert (summary["rows"], summary["failed"]) == (4, 3)
    errors = {Path(r["path"]).name: r["error"] for r in pq.read_table(out).to_pylist()}
    assert errors["good.wav"] is None
    assert "pipe.wav" in errors["pipe.wav"] and "regular" in errors["pipe.wav"]
    assert "dangling.png" in errors["dangling.png"] and "broken symbolic link" in errors["dangling.png"]
    assert "loop.wav" in errors["loop.wav"]


def test_the_ray_engine_ships_absolute_paths_a_worker_reads_from_anywhere(corpus, bundle, library, tmp_path):
    from synergy.serve.corpus import Item, RayEmbedder, ray_items

    os.chdir(corpus)
    try:
        shipped = ray_items([Item("audio/val/blue_star_0000.wav", "audio")])
    finally:
        os.chdir(tmp_path)  # the worker: another folder
    assert shipped[0]["path"] == "audio/val/blue_star_0000.wav"  # the row keeps the path as given (resume keys)
    assert shipped[0]["source"] == str(corpus / "audio/val/blue_star_0000.wav")
    batch = {key: np.array([row[key] for row in shipped], dtype=object) for key in shipped[0]}
    rows = RayEmbedder(str(bundle), 1, 8)(batch)
    assert rows["error"][0] == "" and rows["path"][0] == "audio/val/blue_star_0000.wav"
    expected = library.embed_audio([corpus / "audio/val/blue_star_0000.wav"])[0]
    np.testing.assert_allclose(rows["embedding"][0], expected, atol=2e-6)


def test_approximate_hits_read_only_the_row_groups_that_hold_them(tmp_path):
    pytest.importorskip("usearch", reason="usearch is not installed (synergy-clip[index])")
    from synergy.serve.ann import build_index
    from synergy.serve.corpus import ParquetParts
    from synergy.serve.search import approximate_hits

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 21))  # one per row group, so a query's neighbours share its group
    vectors = (np.repeat(centres, 100, axis=0) + 0.05 * rng.standard_normal((1000, 21))).astype(np.float32)
    out = tmp_path / "index.parquet"
    writer = ParquetParts(out, 21)
    writer.ROW_GROUP = 100  # ten row groups
    writer.write(
        {
            "path": [f"clip{i:04d}.wav" for i in range(1000)],
            "modality": ["audio" if i % 2 else "image" for i in range(1000)],
            "embedding": list(vectors),
            "error_type": [None] * 1000,
            "error": [None] * 1000,
        }
    )
    writer.finish()
    build_index(out)
    # damage row group 5's columns (rows 500-599) in place, keeping the size and time the index's record checks
    stat, meta = out.stat(), pq.ParquetFile(out).metadata
    data = bytearray(out.read_bytes())
    for column in range(2):  # path, modality
        chunk = meta.row_group(5).column(column)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    out.write_bytes(bytes(data))
    os.utime(out, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(Exception):  # noqa: B017 - the whole column cannot be read any more
        pq.read_table(out, columns=["path"])

    for query_row in (42, 917):  # hits far from the damaged group
        hits = approximate_hits(str(out), vectors[query_row], 1, None)
        assert hits is not None and hits[0].path == f"clip{query_row:04d}.wav"
        hits = approximate_hits(str(out), vectors[query_row], 1, "image" if query_row % 2 == 0 else "audio")
        assert hits is not None and hits[0].path == f"clip{query_row:04d}.wav"

    from synergy.runtime import InferUsageError

    with pytest.raises(InferUsageError, match=re.escape(f"--index {out}: damaged")):  # a hit in the damaged group
        approximate_hits(str(out), vectors[550], 1, None)
