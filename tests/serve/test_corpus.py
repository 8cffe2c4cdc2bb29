"""``synergy embed`` + ``synergy search`` on the synthetic demo data: a parquet row per file equal to the library's
embedding, bad files listed and never fatal, resumable, a clip's own embedding finds itself first; the Ray engine
writes the same rows as the local one."""

from __future__ import annotations

import json
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
    """The synthetic set (1 clip + 1 picture per class and split) plus a broken WAV and a stray text file."""
    from synergy.train.datasets.synth import synthesize

    folder = tmp_path_factory.mktemp("corpus") / "synth"
    synthesize(folder, seed=0, train_per_class=1, val_per_class=1, heldout_per_class=1)
    (folder / "audio" / "val" / "broken.wav").write_bytes(b"RIFF, but not really a WAV file")
    (folder / "notes.txt").write_text("not a media file")
    return folder


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_embed_then_search_round_trip(corpus, bundle, library, tmp_path):
    out = tmp_path / "embeddings.parquet"
    done = synergy("embed", str(corpus / "audio"), str(corpus / "images"), "--bundle", str(bundle), "--out", str(out))
    assert done.returncode == 1, done.stderr  # one broken file: listed, not fatal
    assert f"failed: {corpus / 'audio/val/broken.wav'}: cannot be decoded" in done.stderr
    rows = read_rows(out)
    assert [(r["path"], r["modality"]) for r in rows] == sorted((r["path"], r["modality"]) for r in rows)
    files = [p for p in corpus.rglob("*") if p.suffix in (".wav", ".png")]
    assert len(rows) == len(files) and sum(r["error"] is not None for r in rows) == 1
    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), library.manifest.embed_dim)
    for modality in ("audio", "image"):
        good = [r for r in rows if r["modality"] == modality and r["error"] is None]
        expected = library.embed_batch(modality, [r["path"] for r in good]).vectors
        np.testing.assert_allclose([r["embedding"] for r in good], expected, atol=2e-6)
    broken = next(r for r in rows if r["error"] is not None)
    assert broken["embedding"] is None and broken["error_type"] == "UnsupportedAudio"

    query = corpus / "audio/val/blue_star_0000.wav"
    found = synergy("search", "--index", str(out), "--bundle", str(bundle), "--audio", str(query), "--json")
    assert found.returncode == 0, found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(hits) == 10 and hits[0]["path"] == str(query) and hits[0]["score"] > 0.9999
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    from synergy.serve.search import search_index  # the same search in-process: no more child start-ups

    picture = corpus / "images/train/red_circle_0000.png"
    hits = search_index(out, library.embed_image([picture])[0], top_k=5)
    assert hits[0].path == str(picture) and hits[0].score > 0.9999
    hits = search_index(out, library.embed_text(["a dog"])[0], top_k=10, modality="image")
    assert len(hits) == 10 and {h.modality for h in hits} == {"image"}


def test_search_matches_a_full_scan_with_small_blocks(tmp_path):
    from synergy.serve.corpus import ParquetParts
    from synergy.serve.search import search_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1000, 21)).astype(np.float32)
    writer = ParquetParts(tmp_path / "index.parquet", 21)
    for start in range(0, 1000, 300):
        chunk = list(range(start, min(start + 300, 1000)))
        writer.write(
            {
                "path": [f"clip{i:04d}.wav" for i in chunk],
                "modality": ["audio"] * len(chunk),
                "embedding": [None if i % 97 == 0 else vectors[i] for i in chunk],  # some failed rows
                "error_type": [None] * len(chunk),
                "error": ["bad" if i % 97 == 0 else None for i in chunk],
            }
        )
    writer.finish()
    query = rng.standard_normal(21).astype(np.float32)
    hits = search_index(tmp_path / "index.parquet", query, top_k=7, block_rows=64)
    normalised = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = normalised @ (query / np.linalg.norm(query))
    scores[::97] = -np.inf
    best = np.argsort(-scores)[:7]
    assert [h.path for h in hits] == [f"clip{i:04d}.wav" for i in best]
    np.testing.assert_allclose([h.score for h in hits], scores[best], atol=1e-5)


def test_embed_resumes_and_reads_manifests(corpus, bundle, tmp_path):
    from synergy.serve.corpus import ParquetParts, embed_corpus

    out = tmp_path / "val.parquet"
    first = embed_corpus([str(corpus / "val.csv")], str(bundle), str(out), chunk_size=8)
    assert first == {**first, "items": 32, "skipped": 0, "embedded": 32, "failed": 0, "rows": 32}
    before = read_rows(out)
    assert {r["path"] for r in before} == {str(corpus / p) for p in _manifest_paths(corpus / "val.csv")}

    again = embed_corpus([str(corpus / "val.csv")], str(bundle), str(out))
    assert (again["skipped"], again["embedded"]) == (32, 0) and read_rows(out) == before

    # a run killed after some parts: they are whole files, kept and merged by the next run
    more = tmp_path / "all.parquet"
    shutil.copy(out, more)
    leftover = ParquetParts(more, 21)
    leftover.write(
        {
            "path": [str(corpus / "audio/val/broken.wav")],
            "modality": ["audio"],
            "embedding": [None],
            "error_type": ["UnsupportedAudio"],
            "error": ["from the killed run"],
        }
    )
    resumed = embed_corpus([str(corpus / "val.csv"), str(corpus / "audio/val")], str(bundle), str(more))
    assert resumed["skipped"] == 32 and resumed["items"] == 33  # val audio is in the CSV too; broken.wav retried
    rows = read_rows(more)
    assert not leftover.parts.exists() and len(rows) == 33
    broken = next(r for r in rows if r["path"].endswith("broken.wav"))
    assert broken["error"] != "from the killed run"  # failed items are retried, the new error replaces the old


def _manifest_paths(csv_path: Path) -> list[str]:
    import csv

    with open(csv_path, newline="") as f:
        return [cell for row in csv.DictReader(f) for cell in (row["img_path"], row["wav_path"]) if cell]


@pytest.mark.slow  # a local Ray instance starts in 10-30 s on 2 cores
def test_ray_engine_writes_the_same_rows_as_the_local_engine(corpus, bundle, tmp_path):
    pytest.importorskip("ray.data", reason="synergy-clip[ray] is not installed (ray[data])")
    inputs = [str(corpus / "val.csv"), str(corpus / "audio/val/broken.wav")]
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert synergy("embed", *inputs, "--bundle", str(bundle), "--out", str(local)).returncode == 1
    done = synergy(
        "embed",
        *inputs,
        "--bundle",
        str(bundle),
        "--out",
        str(remote),
        "--engine",
        "ray",
        "--workers",
        "2",
        "--threads",
        "1",
        "--batch-size",
        "8",
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    a, b = read_rows(local), read_rows(remote)
    assert [(r["path"], r["modality"], r["error"]) for r in a] == [(r["path"], r["modality"], r["error"]) for r in b]
    for x, y in zip(a, b):
        if x["embedding"] is not None:
            np.testing.assert_allclose(x["embedding"], y["embedding"], atol=2e-6)


def test_inputs_that_are_not_media_are_rows_with_their_reason(corpus, bundle, tmp_path):
    from synergy.serve.corpus import embed_corpus

    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)  # named as a video, but not one
    out = tmp_path / "odd.parquet"
    inputs = [str(tmp_path / "nothing-*.wav"), str(tmp_path / "clip.mp4"), str(corpus / "notes.txt")]
    summary = embed_corpus([*inputs, str(corpus / "audio/val/blue_star_0000.wav")], str(bundle), str(out))
    assert (summary["rows"], summary["failed"]) == (4, 3)
    errors = {Path(r["path"]).name: r["error"] for r in read_rows(out)}
    assert errors["nothing-*.wav"].endswith("no files match this pattern")
    assert "clip.mp4" in errors["clip.mp4"]  # the video decoder's own message
    assert "not an audio, image or video file (extension '.txt')" in errors["notes.txt"]
    assert errors["blue_star_0000.wav"] is None


def test_approximate_index_agrees_with_the_exact_scan_and_is_not_used_when_stale(corpus, bundle, library, tmp_path):
    pytest.importorskip("usearch", reason="usearch is not installed (synergy-clip[index])")
    from synergy.serve.corpus import embed_corpus
    from synergy.serve.search import approximate_hits, search_index

    out = tmp_path / "val.parquet"
    embed_corpus([str(corpus / "val.csv")], str(bundle), str(out), build_index=True)
    assert out.with_suffix(".usearch").is_file()
    clip = corpus / "audio/val/green_circle_0000.wav"
    query = library.embed_audio([clip])[0]
    approximate = approximate_hits(str(out), query, 10, None)
    exact = search_index(out, query, 10)
    assert approximate[0].path == str(clip) and approximate[0].score > 0.9999
    assert [h.path for h in approximate] == [h.path for h in exact]  # 32 rows: the graph search is exact here
    np.testing.assert_allclose([h.score for h in approximate], [h.score for h in exact], atol=5e-4)  # f16 storage
    images = approximate_hits(str(out), query, 5, "image")
    assert images is not None and {h.modality for h in images} == {"image"}
    assert [h.path for h in images] == [h.path for h in search_index(out, query, 5, "image")]

    embed_corpus([str(corpus / "val.csv"), str(corpus / "heldout.csv")], str(bundle), str(out))  # rewrites out
    assert approximate_hits(str(out), query, 10, None) is None  # stale: the caller scans instead


def test_videos_are_rows_with_the_runtimes_fused_embedding(bundle, library, tmp_path):
    pytest.importorskip("av", reason="synergy-clip[video] is not installed (PyAV)")
    from synergy.serve.corpus import embed_corpus
    from synergy.train.datasets.synth_video import write_video

    from .conftest import SAMPLE_RATE, tone

    rng = np.random.default_rng(0)
    folder = tmp_path / "videos"
    folder.mkdir()
    for i, suffix in enumerate((".mp4", ".webm")):
        frames = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
        write_video(folder / f"clip{i}{suffix}", frames, 3, tone(2.0, freq=300 + 200 * i), SAMPLE_RATE)
    out = tmp_path / "videos.parquet"
    summary = embed_corpus([str(folder)], str(bundle), str(out))
    assert (summary["rows"], summary["failed"]) == (2, 0)
    rows = read_rows(out)
    assert {r["modality"] for r in rows} == {"video"}
    expected = library.embed_video_batch([r["path"] for r in rows]).fused
    np.testing.assert_allclose([r["embedding"] for r in rows], expected, atol=2e-6)
