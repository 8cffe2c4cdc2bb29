"""The `synergy` command: the click group, with one module per group of commands beside it. Each command imports
its heavy modules inside the function, so `synergy infer` (the torch-free runtime) starts without importing torch,
and usage errors are found before torch loads.

One vocabulary for every command: `--checkpoint` is a folder written by `synergy train`, `--bundle` a folder written
by `synergy export`, `--data` a manifest CSV, `--out` what the command writes (a folder for `data synth`, `train` and
`export`; a file for `eval` and `infer`). One exit-code contract: 0 ok, 1 some inputs failed (each reported), 2 a
usage, checkpoint or bundle error (nothing ran). Removed spellings (`--model`, a positional CHECKPOINT, `--eval-data`)
are refused with the new one named.

    cli/options.py   the shared checks, exit codes and options
    cli/presets.py   synergy presets
    cli/towers.py    synergy towers list | minilm
    cli/data.py      synergy data synth | from-videos
    cli/train.py     synergy train, synergy eval
    cli/export.py    synergy export
    cli/infer.py     synergy infer (inputs, the run); cli/infer_output.py its table and JSON lines
    cli/serve.py     synergy serve, embed, search
    cli/mmr.py       synergy mmr train | eval | reconstruct
"""

from __future__ import annotations

import click

from .data import data_group
from .export import export_command
from .infer import infer_command
from .mmr import mmr_group
from .presets import presets_command
from .serve import embed_command, search_command, serve_command
from .towers import towers_group
from .train import eval_command, train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="synergy-clip")
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


for command in (
    presets_command,
    towers_group,
    data_group,
    train_command,
    eval_command,
    export_command,
    infer_command,
    serve_command,
    embed_command,
    search_command,
    mmr_group,
):
    main.add_command(command)
