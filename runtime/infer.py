"""``synergy infer``: zero-shot classification of files from the command line (the click command in ``cli.py`` is a
thin wrapper around ``run``).

Inputs: each ``--audio`` / ``--image`` item is a file, a folder (its files with a known extension, not
recursive) or a glob (``'data/**/*.wav'`` recurses). When both audio and image are given, they are fused by
default: the i-th audio file pairs with the i-th image file (folders and globs expand sorted by name), and both
lists must have the same length; with ``fuse=False`` every file is classified on its own.

Output: a table for people (failures on stderr), or with ``as_json`` one JSON object per input on stdout::

    {"input": "a.wav", "modality": "audio", "ok": true, "top": [{"label": "dog", "probability": 0.91,
     "similarity": 0.31}, ...]}
    {"input": "b.wav", "modality": "audio", "ok": false, "error": {"type": "UnsupportedAudio", "message": "..."}}

Exit codes: 0 every input classified; 1 some inputs failed (each reported); ``InferUsageError`` (the CLI's exit
code 2) when nothing can run: no inputs, bad labels, an unusable bundle or backend.
"""

from __future__ import annotations

import glob
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .audio import AUDIO_EXTENSIONS
from .errors import BundleError, InferUsageError, UnsupportedAudio, UnsupportedImage
from .image import IMAGE_EXTENSIONS
from .labels import read_labels
from .runtime import Prediction, Runtime

DEFAULT_MODEL = "runs/demo/bundle"
SOURCE_WIDTH = 60


def expand_inputs(items: Sequence[str], modality: str) -> tuple[list[str], list[Prediction]]:
    """Files, folders and globs -> (files in order, failures for folders/globs that match nothing)."""
    extensions = AUDIO_EXTENSIONS if modality == "audio" else IMAGE_EXTENSIONS
    error_type = UnsupportedAudio if modality == "audio" else UnsupportedImage
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


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def format_table(predictions: list[Prediction], width: int, label_width: int, header: bool) -> list[str]:
    """Rows for people: input, rank, label, probability, cosine similarity. Failures are left to stderr."""
    lines = [f"{'input':<{width}}  {'#':>2}  {'label':<{label_width}}  {'prob':>6}  {'cos':>6}"] if header else []
    for prediction in (p for p in predictions if p.ok):
        for rank, score in enumerate(prediction.top, 1):
            source = _shorten(prediction.source, width) if rank == 1 else ""
            lines.append(
                f"{source:<{width}}  {rank:>2}  {score.label:<{label_width}}  "
                f"{score.probability:>6.1%}  {score.similarity:>6.3f}"
            )
    return lines


def to_json(prediction: Prediction, modality: str) -> str:
    record: dict = {"input": prediction.source, "modality": modality, "ok": prediction.ok}
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
    model: str = DEFAULT_MODEL,
    top_k: int = 5,
    as_json: bool = False,
    backend: str = "auto",
    device: str = "cpu",
    batch_size: int = 32,
    fuse: bool = True,
    threads: int | None = None,
) -> int:
    """Classify audio and/or image files against ``labels`` with the bundle at ``model``; print the results.
    Returns 0 (all inputs ok) or 1 (some failed, each reported); raises ``InferUsageError`` for usage problems."""
    audio, image = list(audio or ()), list(image or ())
    if not audio and not image:
        raise InferUsageError("no inputs: give at least one --audio or --image (a file, a folder or a glob)")
    if top_k < 1 or batch_size < 1:
        raise InferUsageError(f"--top-k and --batch-size must be >= 1 (got {top_k} and {batch_size})")
    label_list = read_labels(labels)  # LabelsError is an InferUsageError
    audio_files, audio_failures = expand_inputs(audio, "audio")
    image_files, image_failures = expand_inputs(image, "image")
    fused = fuse and bool(audio) and bool(image)
    if fused and len(audio_files) != len(image_files):
        raise InferUsageError(
            f"--audio gives {len(audio_files)} files and --image {len(image_files)}; fused inputs pair one to one "
            "(i-th audio with i-th image), so give as many of each, or classify them separately"
        )
    try:
        runtime = Runtime.open(model, backend=backend, device=device, threads=threads, batch_size=batch_size)
    except BundleError as error:
        hint = " (make demo writes it; or pass --model)" if str(model) == DEFAULT_MODEL else ""
        raise InferUsageError(f"{error}{hint}") from error

    if fused:
        jobs = [("audio+image", {"audio": audio_files, "image": image_files})]
    else:
        jobs = [(m, {m: files}) for m, files in (("audio", audio_files), ("image", image_files)) if files]
    # one layout for the whole table, although results are printed as each batch is done
    names = [" + ".join(pair) for pair in zip(audio_files, image_files)] if fused else audio_files + image_files
    widths = (min(SOURCE_WIDTH, max([len("input"), *map(len, names)])), max([len("label"), *map(len, label_list)]))
    failures = 0
    for modality, failed in (("audio", audio_failures), ("image", image_failures)):
        failures += _report(failed, modality, as_json, widths, header=False)
    header = True
    with runtime:
        for modality, inputs in jobs:
            count = len(next(iter(inputs.values())))
            for start in range(0, count, batch_size):
                chunk = {m: files[start : start + batch_size] for m, files in inputs.items()}
                predictions = runtime.classify(label_list, top_k=top_k, **chunk)
                failures += _report(predictions, modality, as_json, widths, header)
                header = header and not any(p.ok for p in predictions)
    total = len(audio_failures) + len(image_failures) + sum(len(next(iter(i.values()))) for _, i in jobs)
    if failures and not as_json:
        print(f"{failures} of {total} inputs failed", file=sys.stderr, flush=True)
    return 1 if failures else 0


def _report(predictions: list[Prediction], modality: str, as_json: bool, widths: tuple[int, int], header: bool) -> int:
    """Print one chunk's results; returns how many failed."""
    if as_json:
        for prediction in predictions:
            print(to_json(prediction, modality), flush=True)
    else:
        for line in format_table(predictions, *widths, header):
            print(line)
        for prediction in predictions:
            if not prediction.ok:
                print(f"error: {type(prediction.error).__name__}: {prediction.error}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    return sum(not p.ok for p in predictions)
