"""`synergy mmr train | eval | reconstruct`: missing-modality reconstruction heads over a frozen checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from .options import UsageProblem, check_checkpoint, check_csv, manifest_labels


@click.group("mmr")
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
    checkpoint = check_checkpoint(checkpoint_dir)
    check_csv(data)
    if val_data:
        check_csv(val_data, "--val-data")

    from synergy.core.checkpoint import CheckpointError
    from synergy.core.config import ConfigError
    from synergy.train.data import DataError
    from synergy.train.mmr.train import mmr_config, train_mmr

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
    from synergy.train.mmr.evaluate import evaluate_mmr, format_mmr_report, write_mmr_report
    from synergy.train.mmr.train import load_mmr

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
    from synergy.train.mmr.evaluate import reconstruct_files, save_image, write_grid
    from synergy.train.mmr.train import load_mmr

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
