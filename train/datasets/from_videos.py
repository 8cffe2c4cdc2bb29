"""``synergy data from-videos``: a folder of videos (the VGGSound layout) -> a Synergy-CLIP manifest of PNG frames and
16 kHz WAV soundtracks, as Synergy-CLIP prepares its data offline.

Each video is decoded once (``runtime.video.load_video``, the runtime's decoder): its middle frame (or ``frames`` K
frames, uniformly, one manifest row each) is written as PNG and its soundtrack as mono 16-bit WAV at
``sample_rate``. Rows: ``img_path, wav_path, label, caption`` (relative to the manifest), an empty ``wav_path`` for a
silent video and an empty ``img_path`` for an audio-only file. Labels come from a CSV or from the folder names;
captions from a template (``"a video of a {}."``) unless the labels CSV has a ``caption`` column.

Labels CSV: a header with a file column (``file``, ``path``, ``video``, ``filename`` or ``video_path``: a path
relative to DIR, or whose file stem names the video) and ``label`` (and optionally ``caption``); or VGGSound's own
``vggsound.csv`` (no header: ``youtube_id, start_seconds, label, split``), whose clips are ``{youtube_id}_{start:06d}``.

Resumable: every output file is written under a temporary name and renamed, and each finished video is appended to
``out/progress.jsonl``; a rerun skips the videos listed there, so an interrupted run continues where it stopped.
Bad videos (undecodable, truncated, ...) are listed in ``out/bad_videos.txt`` with the reason and left out of the
manifest; the run goes on. ``out/manifest.csv`` is written last.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synergy.runtime.prompts import check_template, fill_prompt

DEFAULT_CAPTION_TEMPLATE = "a video of a {}."
FILE_COLUMNS = ("file", "path", "video", "filename", "video_path")  # video_path: a video manifest


class FromVideosError(ValueError):
    """The request cannot run (no videos, a bad labels file, conflicting options); the message says what to fix."""


@dataclass(frozen=True)
class FromVideosSummary:
    manifest: Path
    videos: int
    rows: int
    skipped_done: int  # finished by an earlier run
    bad: int
    unlabelled: int
    bad_report: Path

    def __str__(self) -> str:
        lines = [
            f"wrote {self.manifest} ({self.rows} rows from {self.videos - self.bad - self.unlabelled} videos; "
            f"{self.skipped_done} done by an earlier run)"
        ]
        if self.bad:
            lines.append(f"{self.bad} bad video(s) skipped; reasons in {self.bad_report}")
        if self.unlabelled:
            lines.append(f"{self.unlabelled} video(s) without a label in the labels CSV were left out")
        return "\n".join(lines)


def find_videos(folder: Path) -> list[Path]:
    from synergy.runtime.video import VIDEO_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def read_labels_csv(path: Path) -> dict[str, tuple[str, str]]:
    """-> {relative path or stem: (label, caption or "")}."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise FromVideosError(f"--labels {path}: cannot be read ({error})") from error
    if not rows:
        raise FromVideosError(f"--labels {path}: empty; expected a header with file,label[,caption]")
    header = [cell.strip().lower() for cell in rows[0]]
    table: dict[str, tuple[str, str]] = {}
    file_column = next((c for c in FILE_COLUMNS if c in header), None)
    if file_column is not None and "label" in header:
        at, label_at = header.index(file_column), header.index("label")
        caption_at = header.index("caption") if "caption" in header else None
        for row in rows[1:]:
            caption = row[caption_at].strip() if caption_at is not None and caption_at < len(row) else ""
            key = row[at].strip()
            table[key] = (row[label_at].strip(), caption)
            table.setdefault(Path(key).stem, table[key])
        return table
    if len(rows[0]) == 4 and rows[0][1].strip().isdigit():  # vggsound.csv: youtube_id, start_seconds, label, split
        for ytid, start, label, _ in (r for r in rows if len(r) == 4):
            table[f"{ytid.strip()}_{int(start):06d}"] = (label.strip(), "")
        return table
    raise FromVideosError(
        f"--labels {path}: expected a header with a file column ({', '.join(FILE_COLUMNS)}) and label, or "
        "VGGSound's vggsound.csv (youtube_id,start_seconds,label,split without a header)"
    )


def from_videos(
    folder: str | Path,
    out: str | Path,
    *,
    labels_csv: str | Path | None = None,
    labels_from_folders: bool = False,
    frames: int = 1,
    caption_template: str = DEFAULT_CAPTION_TEMPLATE,
    sample_rate: int = 16_000,
    workers: int = 2,
    progress: bool = True,
) -> FromVideosSummary:
    """Build ``out/manifest.csv`` (+ ``images/``, ``audio/``, ``bad_videos.txt``) from the videos under ``folder``."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FromVideosError(f"{folder}: no such folder; give the folder that holds the videos")
    if (labels_csv is None) == (not labels_from_folders):
        raise FromVideosError("give exactly one of --labels labels.csv and --labels-from-folders")
    if frames < 1 or workers < 1 or sample_rate < 8_000:
        raise FromVideosError(f"--frames and --workers must be >= 1 and --sample-rate >= 8000 (got {frames}, "
                              f"{workers}, {sample_rate})")  # fmt: skip
    try:
        check_template(caption_template)
    except ValueError as error:
        raise FromVideosError(f"--caption-template: {error}; write the label as {{}} or {{label}}") from error
    videos = find_videos(folder)
    if not videos:
        raise FromVideosError(f"{folder}: no video files (mp4, webm, mkv, mov, ...) in it or its subfolders")
    table = read_labels_csv(Path(labels_csv)) if labels_csv is not None else None
    jobs, unlabelled = [], 0
    for video in videos:
        relative = video.relative_to(folder)
        if table is None:
            if relative.parent == Path("."):
                raise FromVideosError(f"--labels-from-folders: {relative} is not in a class folder (DIR/<label>/...)")
            label, caption = relative.parts[0].replace("_", " "), ""
        else:
            found = table.get(relative.as_posix()) or table.get(video.stem)
            if found is None:
                unlabelled += 1
                continue
            label, caption = found
        stem = "__".join(relative.with_suffix("").parts)  # unique per file, flat
        jobs.append((str(video), stem, label, caption or fill_prompt(caption_template, label), frames, sample_rate))
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    (out / "audio").mkdir(exist_ok=True)
    done, skipped = extract_all(out, jobs, workers, progress)
    manifest, n_rows, bad = write_manifest(out, jobs, done)
    return FromVideosSummary(manifest, len(videos), n_rows, skipped, bad, unlabelled, out / "bad_videos.txt")


def extract_all(out: Path, jobs: list[tuple], workers: int, progress: bool) -> tuple[dict[str, dict], int]:
    """Extract every job not yet in ``out/progress.jsonl`` (the journal that makes a rerun continue), journalling
    each as it finishes. -> ({stem: journal record} of every job, the number done by an earlier run)."""
    journal = out / "progress.jsonl"
    done = _read_journal(journal)
    todo = [job for job in jobs if job[1] not in done]
    skipped = len(jobs) - len(todo)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), initial=skipped, unit="video", desc="from-videos", dynamic_ncols=True)
    with open(journal, "a", encoding="utf-8") as log:
        for record in _map(_extract, [(str(out), *job) for job in todo], workers):
            log.write(json.dumps(record) + "\n")
            log.flush()  # a finished video is never redone, even after a kill
            done[record["stem"]] = record
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return done, skipped


def write_manifest(out: Path, jobs: list[tuple], done: dict[str, dict]) -> tuple[Path, int, int]:
    """``out/manifest.csv`` (written whole, then renamed into place) and ``out/bad_videos.txt`` from the journal's
    records, in the jobs' order. -> (the manifest, its rows, the bad videos)."""
    manifest_rows, bad = [], []
    for _, stem, *_ in jobs:
        record = done[stem]
        if record["error"]:
            bad.append(f"{record['video']}: {record['error']}")
        manifest_rows += [tuple(row) for row in record["rows"]]
    (out / "bad_videos.txt").write_text("".join(line + "\n" for line in bad), encoding="utf-8")
    manifest = out / "manifest.csv"
    partial = out / "manifest.csv.tmp"
    with open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("img_path", "wav_path", "label", "caption"))
        writer.writerows(manifest_rows)
    os.replace(partial, manifest)
    return manifest, len(manifest_rows), len(bad)


def _read_journal(path: Path) -> dict[str, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: that video is redone
            done[record["stem"]] = record
    return done


def _map(function, jobs: list, workers: int):
    if workers == 1 or len(jobs) <= 1:
        yield from map(function, jobs)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(function, jobs)


def _extract(job) -> dict:
    """One video -> its PNG frame(s) and WAV soundtrack; -> a journal record (rows, or the error)."""
    import soundfile
    from PIL import Image

    from synergy.runtime.errors import InputError
    from synergy.runtime.video import load_video

    out, video, stem, label, caption, frames, sample_rate = job
    root = Path(out)
    record = {"stem": stem, "video": video, "rows": [], "error": None}
    try:
        positions = [0.5] if frames == 1 else [(i + 0.5) / frames for i in range(frames)]
        decoded = load_video(video, sample_rate, positions=positions)
    except InputError as error:
        record["error"] = error.problem
        return record
    wav = ""
    if decoded.audio is not None:
        wav = f"audio/{stem}.wav"
        buffer = io.BytesIO()
        soundfile.write(buffer, np.clip(decoded.audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
        _write_atomic(root / wav, buffer.getvalue())
    images = []
    for k, pixels in enumerate(decoded.frames):
        image = f"images/{stem}.png" if frames == 1 else f"images/{stem}_{k}.png"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        _write_atomic(root / image, buffer.getvalue())
        images.append(image)
    record["rows"] = [(image, wav, label, caption) for image in images] or [("", wav, label, caption)]
    return record


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_bytes(data)
    os.replace(partial, path)
