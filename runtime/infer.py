"""``synergy infer``: zero-shot classification of files from the command line (the click command in ``cli.py`` is a
thin wrapper around ``run``).

Inputs: each ``--audio`` / ``--image`` / ``--video`` item is a file, a folder (its files with a known extension, not
recursive) or a glob (``'data/**/*.wav'`` recurses). A video is one item: its sampled frames and its soundtrack are
fused (``Runtime.classify_video``); its JSON line names the ``streams`` used (``["image", "audio"]``, or one of them
for a silent video or an audio-only container). By default every file gets its own answer, audio and images
alike. ``fuse=True`` (``--fuse``) pairs an audio file with the image file of the same stem (``dog.wav`` +
``dog.png``), classifies each pair as one item, and reports the files left without a partner as failed.

Output: a table for people (failures on stderr), or with ``as_json`` one JSON object per input on stdout, or with
``out`` the same JSON lines written to a file and nothing but failures and the summary on the terminal::

    {"input": "a.wav", "modality": "audio", "ok": true, "top": [{"label": "dog", "probability": 0.91,
     "similarity": 0.31}, ...]}
    {"input": "b.wav", "modality": "audio", "ok": false, "error": {"type": "UnsupportedAudio", "message": "..."}}
    {"input": "c.wav + c.png", "modality": "audio+image", "audio": "c.wav", "image": "c.png", "ok": true, ...}

The last line on stderr is always the summary: ``synergy infer: 320 inputs, 318 ok, 2 failed in 3.1 s``.

Exit codes: 0 every input classified; 1 some inputs failed (each reported); ``InferUsageError`` (the CLI's exit
code 2) when nothing can run: no inputs, bad labels, an unusable bundle or backend, ``fuse`` without any pair.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .audio import AUDIO_EXTENSIONS
from .errors import BundleError, InferUsageError, InputError, UnsupportedAudio, UnsupportedImage, UnsupportedVideo
from .image import IMAGE_EXTENSIONS
from .labels import read_labels
from .runtime import Prediction, Runtime
from .video import VIDEO_EXTENSIONS

EXTENSIONS = {"audio": AUDIO_EXTENSIONS, "image": IMAGE_EXTENSIONS, "video": VIDEO_EXTENSIONS}
ERROR_TYPES = {"audio": UnsupportedAudio, "image": UnsupportedImage, "video": UnsupportedVideo}

DEFAULT_BUNDLE = "runs/demo/bundle"
DEFAULT_MODEL = DEFAULT_BUNDLE  # the old name of the default, kept for callers that import it
SOURCE_WIDTH = 60
LABEL_WIDTH = 40


class UnpairedInput(InputError):
    """With ``fuse``: a file without a file of the other modality that has the same stem."""


def expand_inputs(items: Sequence[str], modality: str) -> tuple[list[str], list[Prediction]]:
    """Files, folders and globs -> (files in order, failures for folders/globs that match nothing)."""
    extensions, error_type = EXTENSIONS[modality], ERROR_TYPES[modality]
    files: list[str] = []
    failures: list[Prediction] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(f) for f in path.iterdir() if f.is_file() and f.suffix.lower() in extensions)
            if not found:
                problem = f"folder has no {modality} files ({', '.join(extensions)})"
                failures.append(Prediction(item, error=error_type(item, problem)))
            files.extend(found)
        elif glob.has_magic(item) and not path.exists():
            found = sorted(f for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                failures.append(Prediction(item, error=error_type(item, "no files match this pattern")))
            files.extend(found)
        else:
            files.append(item)  # a missing file fails later, with its own message
    return files, failures


def pair_by_stem(audio: Sequence[str], image: Sequence[str]) -> tuple[list[tuple[str, str]], list[Prediction]]:
    """``fuse``: audio and image files with the same stem -> (pairs in audio order, one failure per unpaired file).
    Raises ``InferUsageError`` when a stem names two files of one modality (which one to pair would be a guess)."""
    by_stem: dict[str, dict[str, str]] = {"audio": {}, "image": {}}
    for modality, files in (("audio", audio), ("image", image)):
        for file in files:
            stem = Path(file).stem
            other = by_stem[modality].setdefault(stem, file)
            if other != file:
                raise InferUsageError(
                    f"--fuse pairs files by stem, but {other} and {file} are both {modality} named {stem!r}; "
                    "rename one or give only one of them"
                )
    pairs = [(file, by_stem["image"][stem]) for stem, file in by_stem["audio"].items() if stem in by_stem["image"]]
    unpaired = []
    for modality, other in (("audio", "image"), ("image", "audio")):
        for stem, file in by_stem[modality].items():
            if stem not in by_stem[other]:
                problem = f"no {other} file named {stem}.* to fuse with (--fuse pairs files with the same stem)"
                unpaired.append(Prediction(file, error=UnpairedInput(file, problem)))
    return pairs, unpaired


def shorten_path(path: str, width: int) -> str:
    """Fit ``path`` into ``width`` characters by dropping leading folders ("…/audio/dog.wav"); the file name itself
    is never cut (a name longer than ``width`` is shown whole and overflows its column)."""
    if len(path) <= width:
        return path
    parts = path.replace(os.sep, "/").split("/")
    for start in range(1, len(parts)):
        candidate = "…/" + "/".join(parts[start:])
        if len(candidate) <= width:
            return candidate
    return parts[-1]


def display_name(sources: Sequence[str], width: int) -> str:
    """One input (a file, or a fused pair "a.wav + a.png") for the table's input column."""
    if len(sources) == 1:
        return shorten_path(sources[0], width)
    share = max(1, (width - 3 * (len(sources) - 1)) // len(sources))
    return " + ".join(shorten_path(s, share) for s in sources)


def format_table(
    predictions: Sequence[Prediction], names: Sequence[str], width: int, label_width: int, header: bool
) -> list[str]:
    """Rows for people: input, rank, label, probability, cosine similarity. Failures are left to stderr.
    ``names``: what to show for each prediction in the input column (see ``display_name``)."""
    lines = []
    if header:
        lines.append(f"{'input':<{width}}  {'#':>2}  {'label':<{label_width}}  {'probability':>11}  {'similarity':>10}")
    for prediction, name in zip(predictions, names):
        if not prediction.ok:
            continue
        for rank, score in enumerate(prediction.top, 1):
            source = name if rank == 1 else ""
            lines.append(
                f"{source:<{width}}  {rank:>2}  {score.label:<{label_width}}  "
                f"{score.probability:>11.1%}  {score.similarity:>10.3f}"
            )
    return lines


def to_json(prediction: Prediction, modality: str, parts: dict[str, str] | None = None) -> str:
    """One JSON line; ``parts``: for a fused item, its file per modality."""
    record: dict = {"input": prediction.source, "modality": modality, **(parts or {}), "ok": prediction.ok}
    if prediction.modalities:  # a video: the streams it was classified from
        record["streams"] = list(prediction.modalities)
    if prediction.ok:
        record["top"] = [
            {"label": s.label, "probability": round(s.probability, 6), "similarity": round(s.similarity, 6)}
            for s in prediction.top
        ]
    else:
        record["error"] = {"type": type(prediction.error).__name__, "message": str(prediction.error)}
    return json.dumps(record, ensure_ascii=False)


def run(
    audio: Sequence[str],
    image: Sequence[str],
    labels: str,
    bundle: str | None = None,
    top_k: int = 5,
    as_json: bool = False,
    backend: str = "auto",
    device: str = "cpu",
    batch_size: int = 32,
    fuse: bool = False,
    threads: int | None = None,
    out: str | None = None,
    model: str | None = None,
    video: Sequence[str] = (),
    trust_unverified: bool = False,
) -> int:
    """Classify audio and/or image files against ``labels`` with the bundle folder ``bundle``; print the results.

    ``model``: the old name of ``bundle``. ``out``: write the JSON lines to this file instead of printing results.
    ``trust_unverified``: open a bundle whose files are not listed with sha256 hashes (``--trust-unverified``).
    Returns 0 (all inputs ok) or 1 (some failed, each reported); raises ``InferUsageError`` for usage problems."""
    started = time.perf_counter()
    bundle = bundle or model or DEFAULT_BUNDLE
    audio, image, video = list(audio or ()), list(image or ()), list(video or ())
    if not audio and not image and not video:
        raise InferUsageError("no inputs: give at least one --audio, --image or --video (a file, a folder or a glob)")
    if top_k < 1 or batch_size < 1:
        raise InferUsageError(f"--top-k and --batch-size must be >= 1 (got {top_k} and {batch_size})")
    if fuse and not (audio and image):
        raise InferUsageError("--fuse pairs audio with images: give both --audio and --image")
    if out is not None and Path(out).is_dir():
        raise InferUsageError(f"--out {out} is a folder; give a file name such as results.jsonl")
    label_list = read_labels(labels)  # LabelsError is an InferUsageError
    audio_files, audio_failures = expand_inputs(audio, "audio")
    image_files, image_failures = expand_inputs(image, "image")
    video_files, video_failures = expand_inputs(video, "video")
    failed_early = audio_failures + image_failures
    if fuse:
        pairs, unpaired = pair_by_stem(audio_files, image_files)
        if not pairs:
            raise InferUsageError(
                f"--fuse found no audio and image files with the same stem among {len(audio_files)} audio and "
                f"{len(image_files)} image files; name each pair alike (dog.wav + dog.png) or drop --fuse"
            )
        failed_early += unpaired
        print(
            f"--fuse: {len(pairs)} audio+image pair(s) by file stem"
            + (f"; {len(unpaired)} file(s) without a partner (reported as failed)" if unpaired else ""),
            file=sys.stderr,
            flush=True,
        )
        # job: (modality, classify() inputs, per-item {modality: file})
        jobs = [("audio+image", {"audio": [a for a, _ in pairs], "image": [i for _, i in pairs]})]
    else:
        jobs = [(m, {m: files}) for m, files in (("audio", audio_files), ("image", image_files)) if files]
    jobs += [("video", {"video": video_files})] if video_files else []  # a video fuses its own frames and sound
    if trust_unverified:
        print(f"note: --trust-unverified: {bundle} is not checked against sha256 hashes", file=sys.stderr, flush=True)
    try:
        runtime = Runtime.open(
            bundle,
            backend=backend,
            device=device,
            threads=threads,
            batch_size=batch_size,
            trust_unverified=trust_unverified,
        )
        # load what the jobs use now: a broken graph is a one-line bundle error (exit 2) before any output
        runtime.load(
            *(m for m in ("text", *{m for _, inputs in jobs for m in inputs}) if m in ("text", "audio", "image"))
        )
    except BundleError as error:
        hint = " (make demo writes it; or pass --bundle)" if str(bundle) == DEFAULT_BUNDLE else ""
        raise InferUsageError(f"{error}{hint}") from error

    all_sources = [list(sources) for _, inputs in jobs for sources in zip(*inputs.values())]
    width = min(SOURCE_WIDTH, max([len("input"), *(len(" + ".join(s)) for s in all_sources)]))
    # a very long label overflows its own row rather than padding every row of the table
    table = {
        "width": width,
        "label_width": min(LABEL_WIDTH, max([len("label"), *map(len, label_list)])),
        "header": True,
    }
    sink = open(out, "w", encoding="utf-8") if out is not None else None  # noqa: SIM115 - closed in finally
    counts = {"inputs": 0, "failed": 0}
    try:
        report = _Reporter(as_json, sink, table, counts)
        for prediction in failed_early:
            is_audio = prediction in audio_failures or (
                isinstance(prediction.error, UnpairedInput) and prediction.source in audio_files
            )
            report([prediction], [[prediction.source]], "audio" if is_audio else "image")
        for prediction in video_failures:
            report([prediction], [[prediction.source]], "video")
        with runtime:
            for modality, inputs in jobs:
                count = len(next(iter(inputs.values())))
                for start in range(0, count, batch_size):
                    chunk = {m: files[start : start + batch_size] for m, files in inputs.items()}
                    predictions = runtime.classify(label_list, top_k=top_k, **chunk)
                    report(predictions, [list(s) for s in zip(*chunk.values())], modality, list(chunk))
    except BundleError as error:  # found at first use: still the bundle's fault, exit 2
        raise InferUsageError(str(error)) from error
    finally:
        if sink is not None:
            sink.close()
    failed, total = counts["failed"], counts["inputs"]
    seconds = time.perf_counter() - started
    summary = f"synergy infer: {total} inputs, {total - failed} ok, {failed} failed in {seconds:.1f} s"
    print(summary + (f"; results in {out}" if out is not None else ""), file=sys.stderr, flush=True)
    return 1 if failed else 0


class _Reporter:
    """Prints (or writes) one chunk of results at a time, so a long run shows progress; counts inputs and failures."""

    def __init__(self, as_json: bool, sink, table: dict, counts: dict):
        self.as_json, self.sink, self.table, self.counts = as_json, sink, table, counts

    def __call__(self, predictions, sources, modality: str, modalities: Sequence[str] = ()) -> None:
        self.counts["inputs"] += len(predictions)
        self.counts["failed"] += sum(not p.ok for p in predictions)
        fused = len(modalities) > 1
        for prediction, parts in zip(predictions, sources):
            line = to_json(prediction, modality, dict(zip(modalities, parts)) if fused else None)
            if self.sink is not None:
                self.sink.write(line + "\n")
            elif self.as_json:
                print(line)
        if self.sink is None and not self.as_json:
            names = [display_name(parts, self.table["width"]) for parts in sources]
            width, label_width, header = self.table["width"], self.table["label_width"], self.table["header"]
            lines = format_table(predictions, names, width, label_width, header)
            for line in lines:
                print(line)
            if lines:
                self.table["header"] = False
        if not self.as_json or self.sink is not None:
            for prediction in predictions:
                if not prediction.ok:
                    print(f"error: {type(prediction.error).__name__}: {prediction.error}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        if self.sink is not None:
            self.sink.flush()
