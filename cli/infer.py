"""`synergy infer`: zero-shot classification of files from the command line with an exported bundle, torch-free.

Inputs: each ``--audio`` / ``--image`` / ``--video`` item is a file, a folder (its files with a known extension, not
recursive) or a glob (``'data/**/*.wav'`` recurses). A video is one item: its sampled frames and its soundtrack are
fused (``Runtime.classify_video``); its JSON line names the ``streams`` used (``["image", "audio"]``, or one of them
for a silent video or an audio-only container). By default every file gets its own answer, audio and images
alike. ``--fuse`` pairs an audio file with the image file of the same stem (``dog.wav`` + ``dog.png``), classifies
each pair as one item, and reports the files left without a partner as failed.

Output (cli/infer_output.py): a table for people (failures on stderr), or with ``--json`` one JSON object per input
on stdout, or with ``--out`` the same JSON lines written to a file and nothing but failures and the summary on the
terminal. The last line on stderr is always the summary: ``synergy infer: 320 inputs, 318 ok, 2 failed in 3.1 s on
onnxruntime`` (the engine ``--backend auto`` chose).

Exit codes: 0 every input classified; 1 some inputs failed (each reported); 2 (``InferUsageError``) when nothing can
run: no inputs, bad labels, an unusable bundle or backend, ``--fuse`` without any pair.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from .options import BACKEND_CHOICES, DEFAULT_BUNDLE, UsageProblem, bundle_option


@click.command("infer")
@click.option("--audio", multiple=True, help="Audio file, folder or glob; repeatable.")
@click.option("--image", multiple=True, help="Image file, folder or glob; repeatable.")
@click.option("--video", multiple=True, help="Video file, folder or glob (frames + soundtrack fused); repeatable.")
@click.option("--labels", required=True, type=click.Path(dir_okay=False), help="Candidate labels, one per line.")
@bundle_option()
@click.option("--fuse", is_flag=True, help="Pair each audio file with the image of the same stem: one answer per pair.")
@click.option("--out", "out_path", help="Write JSON lines to this file instead of printing each result.")
@click.option("--top-k", default=5, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout instead of a table.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(BACKEND_CHOICES))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option(
    "--trust-unverified",
    is_flag=True,
    help="Open a bundle whose files are not listed with sha256 hashes (only one you built yourself; see SECURITY.md).",
)
def infer_command(
    audio, image, video, labels, bundle, fuse, out_path, top_k, as_json, backend, device, batch_size, trust_unverified
):
    """Zero-shot classification of audio, images and/or videos with an exported bundle (no torch needed).

    Every file gets its own answer; with --fuse, dog.wav and dog.png are classified together as one item. A summary
    line (inputs, ok, failed, time) ends every run, on stderr.

    Exit codes: 0 all inputs ok, 1 some inputs failed (each reported), 2 usage or bundle error."""
    from synergy.runtime import InferUsageError

    options = InferOptions(
        labels=labels,
        bundle=bundle,
        top_k=top_k,
        as_json=as_json,
        out=out_path,
        fuse=fuse,
        backend=backend,
        device=device,
        batch_size=batch_size,
        trust_unverified=trust_unverified,
    )
    try:
        code = run(InferInputs(audio, image, video), options)
    except InferUsageError as error:
        raise UsageProblem(str(error)) from error
    sys.exit(code)


@dataclass(frozen=True)
class InferInputs:
    """What to classify: files, folders or globs per modality."""

    audio: Sequence[str] = ()
    image: Sequence[str] = ()
    video: Sequence[str] = ()


@dataclass(frozen=True)
class InferOptions:
    """How: the labels file and bundle, what to show, and how the runtime runs."""

    labels: str
    bundle: str = DEFAULT_BUNDLE
    top_k: int = 5
    as_json: bool = False  # JSON lines on stdout instead of the table
    out: str | None = None  # write the JSON lines to this file instead of printing results
    fuse: bool = False  # pair audio and image files by stem
    backend: str = "auto"
    device: str = "cpu"
    batch_size: int = 32
    threads: int | None = None
    trust_unverified: bool = False  # open a bundle whose files are not listed with sha256 hashes


def run(inputs: InferInputs, options: InferOptions) -> int:
    """Classify ``inputs`` against ``options.labels`` with the bundle; print (or write) the results and a summary.

    Returns 0 (all inputs ok) or 1 (some failed, each reported); raises ``InferUsageError`` for usage problems."""
    from synergy.runtime import BundleError, InferUsageError, read_labels

    from .infer_inputs import plan_jobs
    from .infer_output import Reporter, TableLayout

    started = time.perf_counter()
    check_options(inputs, options)
    labels = read_labels(options.labels)  # LabelsError is an InferUsageError
    plan = plan_jobs(inputs, options.fuse)
    runtime = open_runtime(options, plan.jobs)
    layout = TableLayout.fit([list(s) for job in plan.jobs for s in zip(*job.files.values())], labels)
    sink = open(options.out, "w", encoding="utf-8") if options.out is not None else None  # noqa: SIM115 - finally
    report = Reporter(options.as_json, sink, layout)
    try:
        for prediction, modality in plan.failures:
            report([prediction], [[prediction.source]], modality)
        with runtime:
            for job in plan.jobs:
                classify_job(runtime, job, labels, options, report)
    except BundleError as error:  # found at first use: still the bundle's fault, exit 2
        raise InferUsageError(str(error)) from error
    finally:
        if sink is not None:
            sink.close()
    seconds = time.perf_counter() - started
    summary = f"synergy infer: {report.inputs} inputs, {report.inputs - report.failed} ok, {report.failed} failed"
    where = f"; results in {options.out}" if options.out is not None else ""
    print(f"{summary} in {seconds:.1f} s on {runtime.backend}{where}", file=sys.stderr, flush=True)
    return 1 if report.failed else 0


def check_options(inputs: InferInputs, options: InferOptions) -> None:
    """Usage problems that need no file read: each is an ``InferUsageError`` (exit 2)."""
    from synergy.runtime import InferUsageError

    if not inputs.audio and not inputs.image and not inputs.video:
        raise InferUsageError("no inputs: give at least one --audio, --image or --video (a file, a folder or a glob)")
    if options.top_k < 1 or options.batch_size < 1:
        raise InferUsageError(f"--top-k and --batch-size must be >= 1 (got {options.top_k} and {options.batch_size})")
    if options.fuse and not (inputs.audio and inputs.image):
        raise InferUsageError("--fuse pairs audio with images: give both --audio and --image")
    if options.out is not None and Path(options.out).is_dir():
        raise InferUsageError(f"--out {options.out} is a folder; give a file name such as results.jsonl")


# --- the runtime ---------------------------------------------------------------------------------------------------


def open_runtime(options: InferOptions, jobs: Sequence):
    """Open the bundle and load the towers the jobs use, so a broken graph is a one-line bundle error (exit 2)
    before any output."""
    from synergy.runtime import BundleError, InferUsageError, Runtime

    if options.trust_unverified:
        note = f"note: --trust-unverified: {options.bundle} is not checked against sha256 hashes"
        print(note, file=sys.stderr, flush=True)
    towers = {"text", *(m for job in jobs for m in job.files)} & {"text", "audio", "image"}
    try:
        runtime = Runtime.open(
            options.bundle,
            backend=options.backend,
            device=options.device,
            threads=options.threads,
            batch_size=options.batch_size,
            trust_unverified=options.trust_unverified,
        )
        runtime.load(*sorted(towers, key=("text", "audio", "image").index))
    except BundleError as error:
        hint = " (make demo writes it; or pass --bundle)" if str(options.bundle) == DEFAULT_BUNDLE else ""
        raise InferUsageError(f"{error}{hint}") from error
    return runtime


def classify_job(runtime, job, labels: Sequence[str], options: InferOptions, report) -> None:
    """Classify one job in chunks of ``batch_size`` items, reporting each chunk as it is done."""
    count = len(next(iter(job.files.values())))
    for start in range(0, count, options.batch_size):
        chunk = {m: files[start : start + options.batch_size] for m, files in job.files.items()}
        predictions = runtime.classify(labels, top_k=options.top_k, **chunk)
        report(predictions, [list(s) for s in zip(*chunk.values())], job.modality, list(chunk))
