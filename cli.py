"""The `synergy` command. Each command imports its module inside the function, so `synergy infer` (the torch-free
runtime) starts without importing torch."""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="synergy")
def main():
    """Synergy: a tri-modal (image, text, audio) CLIP — train, export, infer."""


@main.command("presets")
def presets_command():
    """List the model presets."""
    from synergy.core.config import list_presets

    click.echo("\n".join(list_presets()))


@main.group("data")
def data_group():
    """Data sets."""


@data_group.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write PNG/WAV/CSV files into.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--train-per-class", default=160, show_default=True, type=int)
@click.option("--val-per-class", default=20, show_default=True, type=int)
@click.option("--heldout-per-class", default=20, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an earlier synth output in --out.")
def synth_command(out, seed, train_per_class, val_per_class, heldout_per_class, overwrite):
    """Write the synthetic tri-modal data set (deterministic by --seed)."""
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
        raise click.ClickException(str(error)) from error
    click.echo(summary)


@main.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), help="Training JSON.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key; repeatable.")
@click.option("--resume", is_flag=True, help="Continue from <out>/checkpoint: same data order and schedule.")
def train_command(config_path, overrides, resume):
    """Train a model (single process, or under torchrun for DDP)."""
    from synergy.core.checkpoint import CheckpointError
    from synergy.core.config import ConfigError
    from synergy.train.config import load_train_config
    from synergy.train.data import DataError
    from synergy.train.loop import train

    try:
        config = load_train_config(config_path, overrides)
        checkpoint = train(config, resume=resume)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"checkpoint: {checkpoint}")


@main.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", "csv_paths", required=True, multiple=True, type=click.Path(), help="Manifest CSV; repeatable.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Candidate labels, one per line (default: the CSV's).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write the metrics JSON here.")
def eval_command(checkpoint, csv_paths, labels, out_path):
    """Zero-shot classification and retrieval metrics of a checkpoint on manifest CSVs."""
    from pathlib import Path

    from synergy.core.checkpoint import CheckpointError, load_checkpoint
    from synergy.train.data import DataError
    from synergy.train.evaluate import evaluate, format_report, write_report

    try:
        model, tokenizer = load_checkpoint(checkpoint)
        label_list = None
        if labels:
            label_list = [
                line.strip() for line in Path(labels).read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        results = {Path(p).stem: evaluate(model, tokenizer, p, label_list) for p in csv_paths}
    except (CheckpointError, DataError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(format_report(results))
    if out_path:
        write_report(results, out_path)
        click.echo(f"metrics: {out_path}")


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(["onnx", "trt", "triton"]))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]))
@click.option("--opset", default=None, type=int, help="ONNX opset, >= 18 (default: 18).")
@click.option("--force", is_flag=True, help="Replace an existing --out bundle.")
@click.option(
    "--eval-data",
    default=None,
    type=click.Path(dir_okay=False),
    help="Synergy-CLIP CSV (e.g. the synthetic val.csv) for the zero-shot agreement check (default: a built-in set).",
)
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
    checkpoint,
    out,
    fmt,
    precision,
    opset,
    force,
    eval_data,
    external_data,
    min_batch,
    opt_batch,
    max_batch,
    triton_platform,
):
    """Export a checkpoint to a verified bundle (ONNX graphs, TensorRT engines or a Triton model repository)."""
    from synergy.export import BatchProfile, ExportError, export_bundle

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
        raise click.ClickException(str(error)) from error
    click.echo(report)


@main.command("infer")
@click.option("--audio", multiple=True, help="Audio file, folder or glob; repeatable.")
@click.option("--image", multiple=True, help="Image file, folder or glob; repeatable.")
@click.option("--labels", required=True, type=click.Path(dir_okay=False), help="Candidate labels, one per line.")
@click.option("--model", default="runs/demo/bundle", show_default=True, help="Bundle folder from `synergy export`.")
@click.option("--top-k", default=5, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "onnxruntime", "tensorrt"]))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--batch-size", default=32, show_default=True, type=int)
def infer_command(audio, image, labels, model, top_k, as_json, backend, device, batch_size):
    """Zero-shot classification of audio and/or images with an exported bundle (no torch needed).

    Exit codes: 0 all inputs ok, 1 some inputs failed (each reported), 2 usage error."""
    from synergy.runtime.errors import InferUsageError
    from synergy.runtime.infer import run

    try:
        code = run(
            audio=list(audio),
            image=list(image),
            labels=labels,
            model=model,
            top_k=top_k,
            as_json=as_json,
            backend=backend,
            device=device,
            batch_size=batch_size,
        )
    except InferUsageError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
