"""Image towers from local folders through the whole path: folder -> checkpoint -> exported bundle -> runtime, against
transformers computing the same (the folder's own image processor -> the same tower weights -> the checkpoint's
projection -> L2 norm), on real image files of odd sizes and modes. fp32 cosine >= 0.9999 per image.

Families: CLIP vision, a whole SigLIP folder (its vision half), ViT with its pooler and without one (pooled on the
class token), DINOv2 (a crop smaller than its config's size: position embeddings interpolated), each a tiny random
folder (tests/conftest.py ``write_image_folder``); then the real EfficientNet-Lite0, trained 2 steps locked (LiT),
against torch and transformers' Bit processor reading the folder's preprocessor_config.json.

transformers' ViT processor has no ``do_convert_rgb`` default and refuses an RGBA image (4 channels, 3 means); the
reference passes ``do_convert_rgb=True`` there, the step its siblings (CLIP, SigLIP, Bit) take by default and the
runtime takes for every family (transparency composited onto white).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from synergy.core.checkpoint import load_checkpoint
from synergy.core.model import create_model
from synergy.core.tokenizer import train_tokenizer
from synergy.runtime import Runtime

pytestmark = pytest.mark.slow

MIN_COSINE = 0.9999
# (width, height, mode): odd sizes both ways, transparency, greyscale, a palette, one past the families' sizes
CASES = [(37, 91, "RGB"), (300, 200, "RGB"), (97, 60, "RGBA"), (91, 37, "L"), (1000, 250, "P"), (40, 40, "RGB")]
PROCESSORS = {"clip": "CLIP", "siglip": "Siglip", "vit": "ViT", "vit-cls": "ViT", "dinov2": "Bit"}
MODELS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "vit": "ViTModel", "dinov2": "Dinov2Model"}


def _picture(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """Gradients under noise (every resize filter and crop offset shows), an alpha gradient for RGBA."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    red, green = x * 255 // max(1, width - 1), y * 255 // max(1, height - 1)
    pixels = np.stack([red, green, rng.integers(0, 256, (height, width))], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(((x + 2 * y) % 256).astype(np.uint8)))
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode != "RGB":
        image = image.convert(mode)
    return image


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, (width, height, mode) in enumerate(CASES):
        paths.append(folder / f"{width}x{height}-{mode}.png")
        _picture(width, height, mode, seed).save(paths[-1])
    return paths


def _tokenizer(model):
    config = model.config
    return train_tokenizer(["a red circle", "the sound of a dog"] * 4, config.text.vocab_size, config.text.max_length)


def _processor_pixels(processor, paths) -> torch.Tensor:
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            pixels.append(processor(images=image, return_tensors="pt")["pixel_values"])
    return torch.cat(pixels)


@pytest.fixture(scope="module", params=sorted(PROCESSORS))
def family_bundle(request, tmp_path_factory, image_folder_writer, model_exporter):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    folder = image_folder_writer(root / "folder", family)
    torch.manual_seed(0)
    model = create_model("tiny", **{"image.pretrained": str(folder)}).eval()
    return family, folder, model, model_exporter(root, model, _tokenizer(model))


def test_each_family_exports_and_the_runtime_matches_its_transformers_processor(
    family_bundle, image_files, cosine, image_processor
):
    """The folder's processor (its preprocessor_config.json) -> the folder's tower (transformers) -> pooled as
    transformers gives it -> the checkpoint's projection -> L2 norm, against the runtime on the bundle."""
    import transformers

    from synergy.core.image_folder import read_image_folder

    family, folder, model, bundle = family_bundle
    name = PROCESSORS[family]
    extra = {"do_convert_rgb": True} if name == "ViT" else {}
    processor = image_processor(name).from_pretrained(folder, **extra)
    tower_class = getattr(transformers, MODELS[family.removesuffix("-cls")])
    tower = tower_class.from_pretrained(folder, **({"add_pooling_layer": False} if family == "vit-cls" else {}))
    with torch.no_grad():
        output = tower.eval()(pixel_values=_processor_pixels(processor, image_files))
        pooled = output.last_hidden_state[:, 0] if family == "vit-cls" else output.pooler_output
        want = F.normalize(model.image_projection(pooled), dim=-1).numpy()
    manifest = json.loads((bundle / "manifest.json").read_text())
    folder_says = read_image_folder(folder)
    assert manifest["image"]["size"] == folder_says.image_size and manifest["format_version"] == 3
    assert (manifest["image"]["resize"], manifest["image"]["resample"]) == (folder_says.resize, folder_says.resample)
    # fp32 parity is onnxruntime's: "auto" may pick OpenVINO bf16 for this bundle (its export's check passed)
    with Runtime.open(bundle, backend="onnxruntime", threads=1, batch_size=4) as runtime:  # batches mix sizes
        got = runtime.embed_image(image_files)
    found = cosine(got, want)
    worst = int(np.argmin(found))
    print(f"\n{family}: runtime vs transformers worst 1 - cosine {1 - found[worst]:.1e} ({image_files[worst].name})")
    assert found.min() >= MIN_COSINE, dict(zip([p.name for p in image_files], found.round(6).tolist()))


def test_the_families_preprocess_and_pool_as_their_folders_say(family_bundle):
    """What the parity above rests on, named: each family's resize, crop, statistics and pooling reach the
    checkpoint (the runtime reads them from the bundle; a checkpoint needs no folder)."""
    family, _, _, bundle = family_bundle
    image = load_checkpoint(bundle.parent / "checkpoint")[0].config.image
    expected = {
        "clip": (32, "shortest_edge", 32, "bicubic", (0.48145466, 0.4578275, 0.40821073), "pooler"),
        "siglip": (40, "exact", 40, "bicubic", (0.5, 0.5, 0.5), "pooler"),
        "vit": (24, "exact", 24, "bilinear", (0.5, 0.5, 0.5), "pooler"),
        "vit-cls": (24, "exact", 24, "bilinear", (0.5, 0.5, 0.5), "cls"),
        "dinov2": (32, "shortest_edge", 37, "bicubic", (0.485, 0.456, 0.406), "pooler"),
    }[family]
    assert (image.image_size, image.resize, image.resize_size, image.resample, image.mean, image.pooling) == expected


# --- the real EfficientNet-Lite0, locked (LiT) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def efficientnet_run(tmp_path_factory, efficientnet_folder):
    """2 training steps of the tiny preset with EfficientNet-Lite0 as its image tower, locked, on the synthetic set;
    exported."""
    from synergy.export import export_bundle
    from synergy.train.config import TrainConfig
    from synergy.train.datasets.synth import synthesize
    from synergy.train.loop import train

    root = tmp_path_factory.mktemp("efficientnet")
    synthesize(root / "data", seed=1, train_per_class=1, val_per_class=1, heldout_per_class=1, missing_rate=0.0)
    config = TrainConfig(
        model="tiny",
        model_overrides={"image.pretrained": str(efficientnet_folder)},
        data=str(root / "data" / "train.csv"),
        out=str(root / "run"),
        batch_size=8,
        steps=2,
        warmup_steps=1,
        workers=0,
        save_every=2,
        lock=("image",),
    )
    checkpoint = train(config, progress=False)
    export_bundle(checkpoint, root / "bundle")
    return checkpoint, root / "bundle"


def test_efficientnet_trains_locked_exports_and_the_runtime_agrees_with_torch(
    efficientnet_run, efficientnet_folder, image_files, cosine, image_processor
):
    from safetensors.torch import load_file

    from synergy.core.efficientnet_lite import EfficientNetLite, EfficientNetLiteConfig
    from synergy.core.pretrained_folders import EFFICIENTNET_LITE0

    checkpoint, bundle = efficientnet_run
    model, _ = load_checkpoint(checkpoint)
    assert model.locked == {"image": 0}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["image"] == {
        "size": 224,
        "resize": "shortest_edge",
        "resize_size": 256,
        "resample": "bicubic",
        "rescale_factor": pytest.approx(1 / 255),
        "mean": [pytest.approx(127 / 255)] * 3,
        "std": [pytest.approx(128 / 255)] * 3,
    }
    licence = manifest["licences"]["image"]
    assert licence["sha256"] == EFFICIENTNET_LITE0.sha256 and licence["licence"] == "Apache-2.0"
    assert "Apache License, Version 2.0" in licence["text"] and EFFICIENTNET_LITE0.distribution in licence["source"]
    skimage = pytest.importorskip("skimage", reason="scikit-image (the dev extra) ships the sample photos")
    image_files = [*image_files, Path(skimage.__file__).parent / "data" / "chelsea.png"]  # a real 451 x 300 photo
    with Runtime.open(bundle, backend="onnxruntime", threads=1, batch_size=4) as runtime:
        got = runtime.embed_image(image_files)
    # the reference: transformers' Bit processor reading the folder's preprocessor_config.json, then the folder's
    # weights in a fresh network (not the checkpoint's), then the trained projection
    pixels = _processor_pixels(image_processor("Bit").from_pretrained(efficientnet_folder), image_files)
    tower = EfficientNetLite(EfficientNetLiteConfig.from_pretrained(efficientnet_folder))
    state = load_file(str(efficientnet_folder / "model.safetensors"))
    tower.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})
    with torch.no_grad():
        want = F.normalize(model.image_projection(tower.eval()(pixels).pooler_output), dim=-1).numpy()
    found = cosine(got, want)
    print(f"\nEfficientNet-Lite0 (locked, 2 steps) runtime vs torch: worst 1 - cosine {1 - found.min():.1e}")
    assert found.min() >= MIN_COSINE, found
