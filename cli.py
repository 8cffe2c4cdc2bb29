"""The `synergy` command. Each command imports its module inside the function, so `synergy infer` (the torch-free
runtime) starts without importing torch, and usage errors are found before torch loads.

One vocabulary for every command: `--checkpoint` is a folder written by `synergy train`, `--bundle` a folder written
by `synergy export`, `--data` a manifest CSV, `--out` what the command writes (a folder for `data synth`, `train` and
`export`; a file for `eval` and `infer`). One exit-code contract: 0 ok, 1 some inputs failed (each reported), 2 a
usage, checkpoint or bundle error (nothing ran). Old spellings still work and print a deprecation note.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import click

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


class UsageProblem(click.ClickException):
    """A usage, checkpoint or bundle error: nothing ran. Shown as "Error: ..." and exits 2."""

    exit_code = EXIT_USAGE


def deprecated(old: str, new: str) -> None:
    """A note on stderr for an old spelling that still works."""
    click.echo(f"note: {old} is deprecated and will be removed; use {new}", err=True)


# `--model`, the old spelling of `--bundle` on every command that reads a bundle; resolved by `pick_bundle`
legacy_model_option = click.option(
    "--model", "legacy_model", default=None, hidden=True, help="Old spelling of --bundle."
)


def pick_bundle(bundle: str | None, legacy_model: str | None) -> str | None:
    """``--bundle``, or its old spelling ``--model`` with a note; both given is a usage error. None: the default."""
    if legacy_model:
        deprecated("--model", "--bundle")
        if bundle:
            raise UsageProblem("both --bundle and --model given; give --bundle only")
    return bundle or legacy_model


def check_csv(path: str, option: str = "--data") -> Path:
    """A manifest CSV given on the command line must exist: a missing one is a typo, not a reason to make data."""
    from synergy.suggest import did_you_mean

    csv_path = Path(path)
    if csv_path.is_file():
        return csv_path
    if csv_path.is_dir():
        raise UsageProblem(f"{option} {path}: is a folder; give the manifest CSV inside it (e.g. {path}/val.csv)")
    folder = csv_path.parent
    siblings = [p.name for p in folder.iterdir() if p.suffix == ".csv"] if folder.is_dir() else []
    hint = did_you_mean(csv_path.name, siblings, cutoff=0.7) if siblings else ""
    where = "" if csv_path.is_absolute() else f" (relative to the current folder {os.getcwd()})"
    raise UsageProblem(f"{option} {path}: no such file{where}{hint}; check the path")


def check_checkpoint(positional: str | None, option: str | None) -> Path:
    """``--checkpoint`` (or the old positional CHECKPOINT): a folder from `synergy train`, checked before torch."""
    if positional and option:
        raise UsageProblem(f"two checkpoints given ({positional} and --checkpoint {option}); give one")
    if positional:
        deprecated(f"the positional CHECKPOINT ({positional})", f"--checkpoint {positional}")
    path = positional or option
    if not path:
        raise UsageProblem(
            "no checkpoint: pass --checkpoint DIR, the folder `synergy train` wrote (e.g. runs/train/checkpoint)"
        )
    folder = Path(path)
    if not folder.is_dir():
        raise UsageProblem(
            f"--checkpoint {path}: no such folder; pass the checkpoint folder that `synergy train` wrote"
        )
    missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if missing:
        inside = folder / "checkpoint"
        hint = f"; did you mean {inside}?" if (inside / "config.json").is_file() else ""
        raise UsageProblem(f"--checkpoint {path}: not a checkpoint (no {' or '.join(missing)}){hint}")
    return folder


def manifest_labels(csv_paths) -> list[str]:
    """The union of the ``label`` column of manifest CSVs, sorted (read with the csv module: no torch needed)."""
    labels: set[str] = set()
    for path in csv_paths:
        with open(path, newline="", encoding="utf-8") as f:
            labels.update((row.get("label") or "").strip() for row in csv.DictReader(f))
    return sorted(label for label in labels if label)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="synergy")
def main():
    """Synergy: a tri-modal (image, text, audio) CLIP — train, export, infer.

    \b
    Words used by every command:
      --checkpoint DIR  a folder written by `synergy train` (config.json, model.safetensors, tokenizer.json)
      --bundle DIR      a folder written by `synergy export` (manifest.json, ONNX graphs or engines)
      --data CSV        a manifest: img_path, wav_path, label, caption (paths relative to the CSV's folder)
      --out PATH        what the command writes: a folder (data synth, train, export) or a file (eval, infer)
    Exit codes: 0 ok, 1 some inputs failed (each reported), 2 usage, checkpoint or bundle error.
    """


@main.command("presets")
def presets_command():
    """The model presets: each tower's geometry and the parameter count."""
    import torch

    from synergy.core.config import list_presets, load_config
    from synergy.core.towers import build_audio_tower, build_image_tower, build_text_tower

    builders = {"image": build_image_tower, "text": build_text_tower, "audio": build_audio_tower}
    presets = []
    for name in list_presets():
        config = load_config(name)
        counts = {}
        with torch.device("meta"):  # shapes only: no memory, no initialisation, milliseconds for `large`
            for tower, build in builders.items():
                module, width = build(getattr(config, tower), config.attn_implementation)
                counts[tower] = sum(p.numel() for p in module.parameters()) + width * config.embed_dim  # + projection
        i, t, a = config.image, config.text, config.audio
        towers = {
            "image": f"CLIP ViT  {i.image_size} px, patch {i.patch_size}, {i.layers} layers x {i.width}",
            "text": f"RoBERTa   {t.max_length} tokens, vocab {t.vocab_size}, {t.layers} layers x {t.width}",
            "audio": f"AST       {a.clip_seconds:g} s at {a.sample_rate / 1000:g} kHz, {a.n_mels} mel x "
            f"{a.num_frames} frames, patch {a.patch_size}, {a.layers} layers x {a.width}",
        }
        presets.append((sum(counts.values()) + 3, name, config, towers, counts))  # + the three logit scales
    column = max(len(text) for *_, towers, _ in presets for text in towers.values())
    for total, name, config, towers, counts in sorted(presets, key=lambda preset: preset[0]):
        click.echo(f"{name:<8} {_count(total)} parameters, embed_dim {config.embed_dim}")
        for tower, text in towers.items():
            pretrained = getattr(config, tower).pretrained
            source = f"  from {pretrained}" if pretrained else ""
            click.echo(f"  {tower:<6} {text:<{column}} {_count(counts[tower]):>8}{source}")
    click.echo("(parameters counted on torch's meta device: towers + projections + 3 logit scales)")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


@main.group("data")
def data_group():
    """Data sets."""


@data_group.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write PNG/WAV/CSV files into.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--train-per-class", default=160, show_default=True, type=int)
@click.option("--val-per-class", default=20, show_default=True, type=int)
@click.option("--heldout-per-class", default=20, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out, replacing an earlier synth output.")
@click.option(
    "--videos",
    "videos_per_class",
    default=0,
    type=int,
    help="Also write N MP4 clips per class (moving shape + its sound) and {split}_videos.csv (video_path rows).",
)
def synth_command(out, seed, train_per_class, val_per_class, heldout_per_class, overwrite, videos_per_class):
    """Write the synthetic tri-modal data set (deterministic by --seed): PNG + WAV files, train/val/heldout CSVs,
    labels.txt and classes.json; with --videos N, also N short videos per class and split."""
    from synergy.train.synth import synthesize

    try:
        summary = synthesize(
            out,
            seed=seed,
            train_per_class=train_per_class,
            val_per_class=val_per_class,
            heldout_per_class=heldout_per_class,
            overwrite=overwrite,
        )
    except (FileExistsError, ValueError) as error:
        raise UsageProblem(str(error)) from error
    click.echo(summary)
    if videos_per_class:
        from synergy.train.synth_video import synthesize_videos

        counts = {"train": videos_per_class, "val": max(1, videos_per_class // 4), "heldout": 1}
        written = synthesize_videos(out, seed=seed, per_class=counts)
        click.echo(f"  videos       {', '.join(p.name for p in written.values())} (MP4, H.264 + AAC)")


@data_group.command("from-videos")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False, exists=True), help="CSV: file,label[,caption] "
              "or VGGSound's vggsound.csv.")  # fmt: skip
@click.option("--labels-from-folders", is_flag=True, help="The label is each video's folder under FOLDER.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for manifest.csv, PNGs, WAVs.")
@click.option("--frames", default=1, show_default=True, type=int, help="Frames per video (1: the middle frame).")
@click.option("--caption-template", default="a video of a {}.", show_default=True, help="Caption when none given.")
@click.option("--sample-rate", default=16_000, show_default=True, type=int, help="Soundtrack WAV rate (Hz).")
@click.option("--workers", default=2, show_default=True, type=int, help="Processes decoding videos.")
def from_videos_command(folder, labels_csv, labels_from_folders, out, frames, caption_template, sample_rate, workers):
    """Turn a folder of videos into a manifest (img_path, wav_path, label, caption): the middle frame (or --frames K)
    as PNG and the soundtrack as WAV. Resumable (rerun to continue); bad videos are listed and skipped (exit 1)."""
    from synergy.train.from_videos import FromVideosError, from_videos

    try:
        summary = from_videos(
            folder,
            out,
            labels_csv=labels_csv,
            labels_from_folders=labels_from_folders,
            frames=frames,
            caption_template=caption_template,
            sample_rate=sample_rate,
            workers=workers,
            progress=sys.stderr.isatty(),
        )
    except (FromVideosError, ImportError) as error:
        raise UsageProblem(str(error)) from error
    click.echo(summary)
    if summary.bad:
        sys.exit(EXIT_SOME_FAILED)


@main.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), help="Training JSON.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key; repeatable.")
@click.option("--resume", is_flag=True, help="Continue <out>/checkpoint: the same data order, schedule and randomness.")
@click.option("--force", is_flag=True, help="Replace an existing <out>/checkpoint (and its metrics) with a new run.")
def train_command(config_path, overrides, resume, force):
    """Train a model (single process, or under torchrun for DDP).

    Needs a data manifest: `data` in the --config JSON or --set data=train.csv (columns img_path, wav_path, label,
    caption; paths relative to the CSV's folder). An existing checkpoint in `out` is continued with --resume or
    replaced with --force, never silently. Ctrl-C saves the checkpoint and prints the command that continues."""
    import shlex

    from synergy.core.config import ConfigError
    from synergy.train.config import load_train_config  # no torch: a bad key or value is reported at once

    if resume and force:
        raise UsageProblem("--resume continues the checkpoint and --force replaces it: choose one")
    try:
        config = load_train_config(config_path, overrides)
    except (ConfigError, ValueError, OSError) as error:
        raise UsageProblem(str(error)) from error

    from synergy.core.checkpoint import CheckpointError
    from synergy.train.data import DataError
    from synergy.train.loop import train

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, one process speaks
    try:
        checkpoint = train(config, resume=resume, force=force)
    except KeyboardInterrupt:
        if main_process:
            again = ["synergy", "train", *(["--config", config_path] if config_path else [])]
            again += [part for item in overrides for part in ("--set", item)] + ["--resume"]
            click.echo(f"interrupted; continue with: {shlex.join(again)}", err=True)
        sys.exit(130)  # the shell's code for a run ended by Ctrl-C
    except CheckpointError as error:
        raise UsageProblem(str(error)) from error
    except (DataError, FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    if main_process:
        click.echo(f"checkpoint: {checkpoint}")


@main.command("eval")
@click.argument("legacy_checkpoint", required=False, metavar="[CHECKPOINT]")
@click.option("--checkpoint", "checkpoint_dir", help="Checkpoint folder from `synergy train`.")
@click.option("--data", "csv_paths", required=True, multiple=True, help="Manifest CSV; repeatable.")
@click.option(
    "--labels",
    help="Candidate labels, one per line (default: the union of every --data CSV's labels, the same for each CSV).",
)
@click.option("--out", "out_path", help="Metrics JSON file to write.")
def eval_command(legacy_checkpoint, checkpoint_dir, csv_paths, labels, out_path):
    """Zero-shot classification and retrieval metrics of a checkpoint on manifest CSVs.

    Each CSV is scored against the same candidates: by default the union of all --data CSVs' labels, so a held-out
    split competes with the seen classes too. The positional CHECKPOINT is the old spelling of --checkpoint."""
    from synergy.runtime.errors import LabelsError
    from synergy.runtime.labels import read_labels  # torch-free

    checkpoint = check_checkpoint(legacy_checkpoint, checkpoint_dir)
    csv_paths = [check_csv(p) for p in csv_paths]
    if out_path and Path(out_path).is_dir():
        raise UsageProblem(f"--out {out_path} is a folder; give the metrics file to write, e.g. {out_path}/eval.json")
    try:
        label_list = list(read_labels(labels)) if labels else manifest_labels(csv_paths)
    except LabelsError as error:
        raise UsageProblem(f"--labels {error}") from error
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UsageProblem(f"cannot read the labels of {', '.join(map(str, csv_paths))}: {error}") from error
    source = f"--labels {labels}" if labels else f"the union of the labels in {len(csv_paths)} CSV(s)"
    click.echo(f"zero-shot candidates: {len(label_list)} labels ({source})", err=True)

    from synergy.core.checkpoint import CheckpointError, load_checkpoint
    from synergy.train.data import DataError
    from synergy.train.evaluate import evaluate, format_report, write_report

    try:
        model, tokenizer = load_checkpoint(checkpoint)
        results = {p.stem: evaluate(model, tokenizer, p, label_list) for p in csv_paths}
    except (CheckpointError, DataError, OSError) as error:
        raise UsageProblem(str(error)) from error
    click.echo(format_report(results))
    if out_path:
        write_report(results, out_path)
        click.echo(f"metrics: {out_path}")
    bad = {split: len(result["bad_rows"]) for split, result in results.items() if result["bad_rows"]}
    if bad:
        counts = ", ".join(f"{n} in {split}" for split, n in bad.items())
        click.echo(f"{sum(bad.values())} rows could not be read ({counts}); they are left out of the metrics", err=True)
        sys.exit(EXIT_SOME_FAILED)


@main.command("export")
@click.argument("legacy_checkpoint", required=False, metavar="[CHECKPOINT]")
@click.option("--checkpoint", "checkpoint_dir", help="Checkpoint folder from `synergy train`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(["onnx", "trt", "triton"]))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]))
@click.option("--opset", default=None, type=int, help="ONNX opset, >= 18 (default: 18).")
@click.option("--force", is_flag=True, help="Replace an existing --out bundle.")
@click.option(
    "--data",
    default=None,
    help="Manifest CSV (e.g. the synthetic val.csv) for the zero-shot agreement check (default: a built-in set).",
)
@click.option("--eval-data", "legacy_eval_data", default=None, hidden=True, help="Old spelling of --data.")
@click.option("--external-data", is_flag=True, help="Keep weights in <graph>.onnx.data files (automatic above 1 GiB).")
@click.option("--min-batch", default=1, show_default=True, type=int, help="TensorRT profile: smallest batch.")
@click.option("--opt-batch", default=8, show_default=True, type=int, help="TensorRT profile / Triton preferred batch.")
@click.option("--max-batch", default=64, show_default=True, type=int, help="TensorRT profile / Triton max_batch_size.")
@click.option(
    "--triton-platform",
    default="onnxruntime",
    show_default=True,
    type=click.Choice(["onnxruntime", "tensorrt"]),
    help="--format triton: ONNX models for Triton's ONNX Runtime backend, or TensorRT plans (needs TensorRT).",
)
def export_command(
    legacy_checkpoint,
    checkpoint_dir,
    out,
    fmt,
    precision,
    opset,
    force,
    data,
    legacy_eval_data,
    external_data,
    min_batch,
    opt_batch,
    max_batch,
    triton_platform,
):
    """Export a checkpoint to a verified bundle (ONNX graphs, TensorRT engines or a Triton model repository).

    The positional CHECKPOINT is the old spelling of --checkpoint, --eval-data the old spelling of --data."""
    checkpoint = check_checkpoint(legacy_checkpoint, checkpoint_dir)
    if legacy_eval_data:
        deprecated("--eval-data", "--data")
        if data:
            raise UsageProblem("both --data and --eval-data given; give --data only")
    eval_data = data or legacy_eval_data
    if eval_data:
        check_csv(eval_data)
    from synergy.export import BatchProfile, ExportError, export_bundle  # torch-free until export_bundle runs
    from synergy.export.bundle import check_output

    try:  # the export checks it again; here the error comes before torch loads
        check_output(checkpoint, Path(out), force)
    except ExportError as error:
        raise UsageProblem(str(error)) from error

    try:
        report = export_bundle(
            checkpoint,
            out,
            fmt=fmt,
            precision=precision,
            opset=opset,
            force=force,
            eval_data=eval_data,
            external_data=True if external_data else None,
            batch=BatchProfile(min_batch, opt_batch, max_batch),
            triton_platform=triton_platform,
        )
    except ExportError as error:
        raise UsageProblem(str(error)) from error
    click.echo(report)


@main.command("infer")
@click.option("--audio", multiple=True, help="Audio file, folder or glob; repeatable.")
@click.option("--image", multiple=True, help="Image file, folder or glob; repeatable.")
@click.option("--video", multiple=True, help="Video file, folder or glob (frames + soundtrack fused); repeatable.")
@click.option("--labels", required=True, type=click.Path(dir_okay=False), help="Candidate labels, one per line.")
@click.option("--bundle", default=None, help="Bundle folder from `synergy export`.  [default: runs/demo/bundle]")
@legacy_model_option
@click.option("--fuse", is_flag=True, help="Pair each audio file with the image of the same stem: one answer per pair.")
@click.option("--out", "out_path", help="Write JSON lines to this file instead of printing each result.")
@click.option("--top-k", default=5, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout instead of a table.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "onnxruntime", "tensorrt"]))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option(
    "--trust-unverified",
    is_flag=True,
    help="Open a bundle whose files are not listed with sha256 hashes (only one you built yourself; see SECURITY.md).",
)
def infer_command(
    audio,
    image,
    video,
    labels,
    bundle,
    legacy_model,
    fuse,
    out_path,
    top_k,
    as_json,
    backend,
    device,
    batch_size,
    trust_unverified,
):
    """Zero-shot classification of audio, images and/or videos with an exported bundle (no torch needed).

    Every file gets its own answer; with --fuse, dog.wav and dog.png are classified together as one item. A summary
    line (inputs, ok, failed, time) ends every run, on stderr.

    Exit codes: 0 all inputs ok, 1 some inputs failed (each reported), 2 usage or bundle error."""
    from synergy.runtime.errors import InferUsageError
    from synergy.runtime.infer import run

    bundle = pick_bundle(bundle, legacy_model)
    try:
        code = run(
            audio=list(audio),
            image=list(image),
            labels=labels,
            bundle=bundle,
            top_k=top_k,
            as_json=as_json,
            backend=backend,
            device=device,
            batch_size=batch_size,
            fuse=fuse,
            out=out_path,
            video=list(video),
            trust_unverified=trust_unverified,
        )
    except InferUsageError as error:
        raise UsageProblem(str(error)) from error
    sys.exit(code)


@main.command("serve")
@click.option("--bundle", default=None, help="Bundle folder from `synergy export`.  [default: runs/demo/bundle]")
@legacy_model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=int, help="Port; 0 picks a free one (printed).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1), help="Items per model call.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0), help="Batch fill wait.")
@click.option(
    "--max-queue",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Waiting items per modality; beyond it requests get 503 + Retry-After.",
)
@click.option("--max-items", default=64, show_default=True, type=click.IntRange(min=1), help="Items per request.")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(min=0.001), help="Body limit.")
@click.option(
    "--timeout",
    "timeout_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Seconds a request may take before it is answered 504.",
)
@click.option(
    "--labels",
    multiple=True,
    type=click.Path(dir_okay=False),
    help='A labels file requests may name by its stem ({"labels": "animals"} for animals.txt); repeatable.',
)
@click.option("--max-labels", default=1024, show_default=True, type=click.IntRange(min=1), help="Labels per request.")
@click.option("--label-cache", default=16_384, show_default=True, type=click.IntRange(min=1), help="Labels cached.")
@click.option(
    "--max-audio-seconds", default=1800.0, show_default=True, type=click.FloatRange(min=0.1), help="Audio per request."
)
@click.option("--max-megapixels", default=256.0, show_default=True, type=click.FloatRange(min=0.01), help="Per request")
@click.option(
    "--read-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.01), help="Request send time."
)
@click.option("--threads", default=None, type=int, help="onnxruntime threads per tower (default: onnxruntime's).")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "onnxruntime", "tensorrt"]))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--drain-seconds", default=30.0, show_default=True, type=float, help="SIGTERM: time to finish requests.")
def serve_command(
    bundle,
    legacy_model,
    host,
    port,
    max_batch,
    max_wait_ms,
    max_queue,
    max_items,
    max_body_mb,
    timeout_s,
    labels,
    max_labels,
    label_cache,
    max_audio_seconds,
    max_megapixels,
    read_timeout,
    threads,
    backend,
    device,
    drain_seconds,
):
    """Serve a bundle over HTTP: /v1/embeddings, /v1/classify, /healthz, /readyz, /metrics (needs synergy[serve]).

    Requests from all clients are micro-batched together; a full queue is answered 503 with Retry-After. SIGTERM
    finishes the requests in flight, then exits 0. Exit 2: usage or bundle error."""
    from synergy.runtime.errors import BundleError, InferUsageError
    from synergy.runtime.infer import DEFAULT_BUNDLE
    from synergy.serve import MissingExtra

    bundle = pick_bundle(bundle, legacy_model)
    try:
        from synergy.serve.app import ServeLimits
        from synergy.serve.server import serve

        limits = ServeLimits(
            max_batch,
            max_wait_ms,
            max_queue,
            max_items,
            round(max_body_mb * 2**20),
            timeout_s,
            max_labels=max_labels,
            label_cache=label_cache,
            max_audio_seconds=max_audio_seconds,
            max_megapixels=max_megapixels,
            read_timeout_s=read_timeout,
        )
        code = serve(
            bundle or DEFAULT_BUNDLE,
            host,
            port,
            limits,
            labels,
            threads,
            backend,
            device,
            drain_seconds,
        )
    except (BundleError, InferUsageError, MissingExtra) as error:
        raise UsageProblem(str(error)) from error
    sys.exit(code)


@main.command("embed")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--bundle", default=None, help="Bundle folder from `synergy export`.  [default: runs/demo/bundle]")
@legacy_model_option
@click.option("--out", "out_path", required=True, help="Parquet file to write (an existing one is resumed).")
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=None, type=int, help="onnxruntime threads per runtime (default: onnxruntime's).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="--engine ray: actors.")
@click.option("--ray-address", default=None, help="--engine ray: the cluster to join (default: a local instance).")
@click.option("--build-index", is_flag=True, help="Also write OUT.usearch, an approximate index for synergy search.")
def embed_command(
    inputs, bundle, legacy_model, out_path, engine, batch_size, threads, workers, ray_address, build_index
):
    """Embed a corpus into a parquet file: INPUTS are manifest CSVs, folders (recursive) or globs of audio, image and
    video files (a video: its frames and soundtrack, fused). One row per file (path, modality, embedding, error);
    resumable; bad files are rows with their error. Exit codes: 0 all embedded, 1 some files failed (listed), 2 usage
    or bundle error."""
    from synergy.runtime.errors import BundleError, InferUsageError
    from synergy.runtime.infer import DEFAULT_BUNDLE
    from synergy.serve import MissingExtra

    bundle = pick_bundle(bundle, legacy_model)
    try:
        from synergy.serve.corpus import embed_corpus

        summary = embed_corpus(
            inputs,
            bundle or DEFAULT_BUNDLE,
            out_path,
            engine=engine,
            batch_size=batch_size,
            threads=threads,
            workers=workers,
            ray_address=ray_address,
            build_index=build_index,
        )
    except (BundleError, InferUsageError, MissingExtra) as error:
        raise UsageProblem(str(error)) from error
    if summary["failed"]:
        import pyarrow.parquet as pq

        for error in pq.read_table(summary["out"], columns=["error"]).column("error").to_pylist():
            if error is not None:
                click.echo(f"failed: {error}", err=True)  # the message names the file
    click.echo(
        f"synergy embed: {summary['items']} files, {summary['skipped']} already done, {summary['embedded']} embedded, "
        f"{summary['failed']} failed in {summary['seconds']:.1f} s -> {summary['out']} ({summary['rows']} rows)",
        err=True,
    )
    sys.exit(EXIT_SOME_FAILED if summary["failed"] else EXIT_OK)


@main.command("search")
@click.option("--index", "index_path", required=True, help="Embeddings parquet written by `synergy embed`.")
@click.option("--bundle", default=None, help="Bundle that embeds the query (the index's).  [default: runs/demo/bundle]")
@click.option("--text", default=None, help="Query text.")
@click.option("--audio", default=None, help="Query audio file.")
@click.option("--image", default=None, help="Query image file.")
@click.option("--top-k", default=10, show_default=True, type=int)
@click.option(
    "--modality", default=None, type=click.Choice(["audio", "image", "video"]), help="Only rows of this modality."
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines (rank, path, modality, score) instead of a table.")
@click.option("--exact", is_flag=True, help="Scan every row even when an index from --build-index is beside it.")
def search_command(index_path, bundle, text, audio, image, top_k, modality, as_json, exact):
    """Cosine search of an embeddings parquet by text, audio or image: an exact blocked numpy scan, or the approximate
    index `synergy embed --build-index` wrote beside it (while it is up to date; --exact scans anyway).

    Exit codes: 0 ok, 1 the query could not be embedded, 2 usage, index or bundle error."""
    from synergy.runtime.errors import BundleError, InferUsageError
    from synergy.runtime.infer import DEFAULT_BUNDLE
    from synergy.serve import MissingExtra

    try:
        from synergy.serve.search import run

        code = run(index_path, bundle or DEFAULT_BUNDLE, text, audio, image, top_k, modality, as_json, exact=exact)
    except (BundleError, InferUsageError, MissingExtra) as error:
        raise UsageProblem(str(error)) from error
    sys.exit(code)


# --- missing-modality reconstruction ---------------------------------------------------------------------------------


@main.group("mmr")
def mmr_group():
    """Missing-modality reconstruction: rebuild one modality from the other two with the checkpoint's frozen
    encoders (image <- text + audio, audio <- image + text, text <- image + audio)."""


def _mmr_set(overrides) -> dict:
    """``--set key=value`` -> {key: value}: JSON where the value parses (numbers, lists, objects), else the string."""
    import json

    values = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageProblem(f"--set {item!r}: expected key=value")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values


@mmr_group.command("train")
@click.option("--checkpoint", "checkpoint_dir", required=True, help="Frozen checkpoint folder from `synergy train`.")
@click.option("--data", required=True, help="Training manifest CSV.")
@click.option("--val-data", default=None, help="Validation manifest (default: 10% of --data, chosen by the seed).")
@click.option("--target", default="all", show_default=True, type=click.Choice(["image", "audio", "text", "all"]))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder: checkpoint/, metrics.jsonl.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="epochs, batch_size, lr, seed, head...")
@click.option("--resume", is_flag=True, help="Continue <out>/checkpoint after its last epoch.")
@click.option("--force", is_flag=True, help="Replace an existing <out>/checkpoint.")
def mmr_train_command(checkpoint_dir, data, val_data, target, out, overrides, resume, force):
    """Train reconstruction heads: real epochs over the manifest, validation after each, a checkpoint per epoch."""
    checkpoint = check_checkpoint(None, checkpoint_dir)
    check_csv(data)
    if val_data:
        check_csv(val_data, "--val-data")

    from synergy.core.checkpoint import CheckpointError
    from synergy.core.config import ConfigError
    from synergy.train.data import DataError
    from synergy.train.mmr import mmr_config, train_mmr

    values = {"checkpoint": str(checkpoint), "data": data, "val_data": val_data, "out": out, **_mmr_set(overrides)}
    if target != "all":
        values["targets"] = [target]
    try:
        folder = train_mmr(mmr_config(values), resume=resume, force=force)
    except (ConfigError, CheckpointError, DataError) as error:
        raise UsageProblem(str(error)) from error
    click.echo(f"MMR checkpoint: {folder}")


@mmr_group.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--data", "csv_paths", required=True, multiple=True, help="Held-out manifest CSV; repeatable.")
@click.option("--labels", help="Zero-shot candidates, one per line (default: the union of the --data CSVs' labels).")
@click.option("--out", "out_path", help="metrics.json to write.")
def mmr_eval_command(run_dir, csv_paths, labels, out_path):
    """Per target: metrics, the mean-of-training and nearest-neighbour baselines, and the semantic check."""
    csv_paths = [check_csv(p) for p in csv_paths]
    from synergy.runtime.labels import read_labels

    label_list = list(read_labels(labels)) if labels else manifest_labels(csv_paths)
    from synergy.core.checkpoint import CheckpointError
    from synergy.train.mmr import load_mmr
    from synergy.train.mmr_eval import evaluate_mmr, format_mmr_report, write_mmr_report

    try:
        run = load_mmr(run_dir)
    except CheckpointError as error:
        raise UsageProblem(str(error)) from error
    result = evaluate_mmr(run, csv_paths, label_list, report=lambda text: click.echo(text, err=True))
    click.echo(format_mmr_report(result))
    if out_path:
        write_mmr_report(result, out_path)
        click.echo(f"metrics: {out_path}")


@mmr_group.command("reconstruct")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--image", type=click.Path(dir_okay=False, exists=True), help="Image file (present modality).")
@click.option("--audio", type=click.Path(dir_okay=False, exists=True), help="Audio file (present modality).")
@click.option("--text", help="Text (present modality).")
@click.option("--out", "out_path", help="PNG (image), WAV (audio) or .txt (text; default: printed).")
@click.option("--grid", type=int, default=None, help="Instead: a PNG of N items of --data, all targets.")
@click.option("--data", "grid_data", help="With --grid: the manifest to draw items from.")
def mmr_reconstruct_command(run_dir, image, audio, text, out_path, grid, grid_data):
    """Rebuild the missing modality from two given ones, e.g. --audio x.wav --text "a red circle" --out y.png; or
    --grid N --data val.csv --out grid.png: inputs, reconstruction and truth side by side."""
    if grid is not None:
        if not grid_data or not out_path:
            raise UsageProblem("--grid N needs --data CSV (the items) and --out PNG")
        if grid < 1:
            raise UsageProblem(f"--grid {grid}: give a number of items >= 1")
        check_csv(grid_data)
    elif sum(v is not None for v in (image, audio, text)) != 2:
        raise UsageProblem("give exactly two of --image, --audio, --text (the missing one is reconstructed)")

    from synergy.core.checkpoint import CheckpointError
    from synergy.runtime.errors import InputError
    from synergy.train.mmr import load_mmr
    from synergy.train.mmr_eval import reconstruct_files, save_image, write_grid

    try:
        run = load_mmr(run_dir)
        if grid is not None:
            click.echo(f"grid: {write_grid(run, grid_data, out_path, n=grid)}")
            return
        target, output = reconstruct_files(run, image=image, audio=audio, text=text)
    except InputError as error:  # an unreadable input file: that input failed
        raise click.ClickException(str(error)) from error
    except (CheckpointError, ValueError) as error:
        raise UsageProblem(str(error)) from error
    if target == "text":
        if out_path:
            Path(out_path).write_text(output + "\n", encoding="utf-8")
        click.echo(output)
        return
    default = {"image": "reconstruction.png", "audio": "reconstruction.wav"}[target]
    path = Path(out_path or default)
    if target == "image":
        save_image(output, path)
    else:
        import soundfile

        soundfile.write(path, output, run.model.config.audio.sample_rate)
    click.echo(f"{target}: {path}")


if __name__ == "__main__":
    main()
