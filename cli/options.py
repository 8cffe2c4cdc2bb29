"""The checks and options every `synergy` command shares: the exit codes, the usage error, and the readers of
--checkpoint, --data and --bundle that run before any heavy import (standard library and click only)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import click

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_BUNDLE = "runs/demo/bundle"  # where `make demo` writes its bundle
# the runtime's backend registry (synergy.runtime.towers.BACKEND_CHOICES) spelt out: importing it here would load
# numpy and tokenizers for every command; tests/runtime/test_openvino.py keeps the two equal
BACKEND_CHOICES = ("auto", "onnxruntime", "openvino", "openvino-bf16", "tensorrt")


class UsageProblem(click.ClickException):
    """A usage, checkpoint or bundle error: nothing ran. Shown as "Error: ..." and exits 2."""

    exit_code = EXIT_USAGE


# --- spellings that were removed: each is refused with the new spelling, so an old script fails loudly ------------


def reject_legacy(ctx: click.Context, param: click.Parameter, value):
    """Callback of a hidden option or argument that only catches a removed spelling."""
    if value is None or value == ():
        return value
    old, new = REMOVED[param.name]
    raise click.UsageError(f"{old.format(value=value)} was removed; use {new.format(value=value)}", ctx=ctx)


REMOVED = {  # parameter name -> (the old spelling, the new one)
    "legacy_model": ("--model", "--bundle {value}"),
    "legacy_checkpoint": ("the positional CHECKPOINT ({value})", "--checkpoint {value}"),
    "legacy_eval_data": ("--eval-data", "--data {value}"),
}

removed_model_option = click.option(
    "--model", "legacy_model", default=None, hidden=True, expose_value=False, callback=reject_legacy
)
removed_checkpoint_argument = click.argument(
    "legacy_checkpoint", required=False, expose_value=False, callback=reject_legacy, metavar=""
)
removed_eval_data_option = click.option(
    "--eval-data", "legacy_eval_data", default=None, hidden=True, expose_value=False, callback=reject_legacy
)


def bundle_option(description: str = "Bundle folder from `synergy export`."):
    """``--bundle DIR`` (default: the demo's bundle), with the removed ``--model`` spelling caught beside it."""

    def decorate(command):
        described = f"{description}  [default: {DEFAULT_BUNDLE}]"
        return click.option("--bundle", default=DEFAULT_BUNDLE, help=described)(removed_model_option(command))

    return decorate


# --- the readers of paths given on the command line ---------------------------------------------------------------


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


def check_checkpoint(path: str | None) -> Path:
    """``--checkpoint``: a folder from `synergy train`, checked before torch loads."""
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
