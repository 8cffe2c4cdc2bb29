"""`synergy train` (a config file plus --set overrides) and `synergy eval` (zero-shot metrics of a checkpoint)."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import click

from .options import (
    EXIT_SOME_FAILED,
    UsageProblem,
    check_checkpoint,
    check_csv,
    manifest_labels,
    removed_checkpoint_argument,
)


@click.command("train")
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


@click.command("eval")
@click.option("--checkpoint", "checkpoint_dir", help="Checkpoint folder from `synergy train`.")
@click.option("--data", "csv_paths", required=True, multiple=True, help="Manifest CSV; repeatable.")
@click.option(
    "--labels",
    help="Candidate labels, one per line (default: the union of every --data CSV's labels, the same for each CSV).",
)
@click.option("--out", "out_path", help="Metrics JSON file to write.")
@removed_checkpoint_argument
def eval_command(checkpoint_dir, csv_paths, labels, out_path):
    """Zero-shot classification and retrieval metrics of a checkpoint on manifest CSVs.

    Each CSV is scored against the same candidates: by default the union of all --data CSVs' labels, so a held-out
    split competes with the seen classes too."""
    from synergy.runtime.errors import LabelsError
    from synergy.runtime.labels import read_labels  # torch-free

    checkpoint = check_checkpoint(checkpoint_dir)
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
