"""What a pretrained image tower's folder says about using it: its family, its pooling and its exact preprocessing.

A ``save_pretrained`` folder's ``config.json`` names the model type, and so the family: CLIP vision, SigLIP vision
(a whole CLIP or SigLIP folder gives its vision half), ViT, DINOv2, or EfficientNet-Lite0 (the folder
``synergy towers efficientnet-lite0`` writes). Its ``preprocessor_config.json`` is read by the family's own
transformers image processor (the PIL one: the default needs torchvision), so legacy spellings (``size: 224``) mean
what transformers makes of them; a folder without one gets that processor's defaults at the tower's size (CLIP,
SigLIP, ViT; DINOv2's has none of its own). The answer is the resize (shortest edge, or exact height x width), the
resampling filter, the center crop, the rescale factor and the mean/std that the runtime (``runtime/image.py``) then
applies; processors it cannot express are refused here, when the model is built, rather than embedded wrongly. Read
once; the checkpoint records the answer, so a checkpoint needs no folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from synergy.core.efficientnet_lite import MODEL_TYPE as EFFICIENTNET_LITE0

# config.json model_type -> family
FAMILIES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "vit": "vit",
    "dinov2": "dinov2",
    EFFICIENTNET_LITE0: "efficientnet-lite0",
}
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's ids
IMAGE_POOLINGS = ("pooler", "cls")


@dataclass(frozen=True)
class ImageFolder:
    family: str
    image_size: int  # the tower's input side: the processor's output
    resize: str  # "shortest_edge" | "exact"
    resize_size: int  # the shortest edge's length, or the exact side, before the center crop to image_size
    resample: str  # a RESAMPLE_NAMES value
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str  # "pooler" (the tower's pooler_output) | "cls" (last_hidden_state[:, 0])


def read_image_folder(folder: str | Path) -> ImageFolder:
    """The family, preprocessing and pooling of the pretrained image tower in ``folder`` (with a config.json)."""
    folder = Path(folder)
    family = image_family(folder)
    size = _tower_image_size(family, folder)
    processor = _processor(family, folder, size)
    resize, resize_size, output = _resize(processor, folder)
    # DINOv2 interpolates its position embeddings to any input (its processor crops 224 for a 518 config); the
    # others take only the size they were built for
    if family != "dinov2" and output != size:
        raise ValueError(
            f"{folder}: the image processor gives {output} x {output} pixels but the tower takes {size} x {size}; "
            "fix preprocessor_config.json (size / crop_size) to the tower's image_size"
        )
    scale = float(processor.rescale_factor) if processor.do_rescale else 1.0
    mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else ((0.0,) * 3, (1.0,) * 3)
    resample = RESAMPLE_NAMES.get(int(processor.resample))
    if resample is None:
        raise ValueError(f"{folder}: resample={processor.resample!r} is not a PIL filter id (0-5)")
    return ImageFolder(
        family=family,
        image_size=output,
        resize=resize,
        resize_size=resize_size,
        resample=resample,
        rescale_factor=scale,
        mean=_triple(mean, folder, "image_mean"),
        std=_triple(std, folder, "image_std"),
        pooling=_pooling(family, folder),
    )


def image_family(folder: Path) -> str:
    model_type = _json(folder / "config.json").get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{folder}/config.json: model_type {model_type!r} is not an image tower family Synergy runs; supported: "
            f"{sorted(set(FAMILIES))} (`synergy towers list`)"
        )
    return FAMILIES[model_type]


def _processor(family: str, folder: Path, size: int):
    """The family's transformers image processor, from the folder's preprocessor_config.json; without one, its
    defaults at the tower's ``size`` (what Synergy did for CLIP folders before it read processors: a CLIP ViT-L/14
    at 336 px is resized and cropped to 336)."""
    import transformers

    name = {"clip": "CLIP", "siglip": "Siglip", "vit": "ViT"}.get(family, "Bit")  # DINOv2, EfficientNet: Bit's
    # transformers >= 5.2x names the PIL-backed processors apart (the plain names need torchvision)
    processor_class = getattr(transformers, f"{name}ImageProcessorPil", None) or getattr(
        transformers, f"{name}ImageProcessor"
    )
    if (folder / "preprocessor_config.json").is_file():
        return processor_class.from_pretrained(folder)
    if family == "efficientnet-lite0":
        raise ValueError(f"{folder} has no preprocessor_config.json; rewrite it: synergy towers efficientnet-lite0")
    if family == "dinov2":  # Bit's defaults (224 / 224, CLIP's statistics) are not DINOv2's (256 / 224, ImageNet's)
        raise ValueError(
            f"{folder} has no preprocessor_config.json, and DINOv2's processor has no defaults of its own; save it "
            "into the folder: AutoImageProcessor.from_pretrained('facebook/dinov2-small').save_pretrained(DIR)"
        )
    at_size = {
        "clip": {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}},
        "siglip": {"size": {"height": size, "width": size}},
        "vit": {"size": {"height": size, "width": size}},
    }
    return processor_class(**at_size.get(family, {}))


def _resize(processor, folder: Path) -> tuple[str, int, int]:
    """-> (resize mode, its size, the output side after the center crop)."""
    size = processor.size
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) else None
    if not processor.do_resize:
        raise ValueError(f"{folder}: the image processor does not resize (do_resize false); Synergy needs a fixed size")
    if getattr(size, "shortest_edge", None):
        mode, side = "shortest_edge", int(size.shortest_edge)
        if crop is None:
            raise ValueError(f"{folder}: a shortest-edge resize without a center crop gives images of any shape")
    elif getattr(size, "height", None) and size.height == size.width:
        mode, side = "exact", int(size.height)
    else:
        raise ValueError(f"{folder}: image processor size {dict(size)} is not supported (a shortest edge, or square)")
    output = side
    if crop is not None:
        if crop.height != crop.width or crop.height > side:
            raise ValueError(f"{folder}: center crop {crop.height} x {crop.width} must be square and fit the resize")
        output = int(crop.height)
    return mode, side, output


def _tower_image_size(family: str, folder: Path) -> int:
    import transformers

    from synergy.core.efficientnet_lite import EfficientNetLiteConfig

    config_class = {
        "clip": transformers.CLIPVisionConfig,
        "siglip": transformers.SiglipVisionConfig,
        "vit": transformers.ViTConfig,
        "dinov2": transformers.Dinov2Config,
        "efficientnet-lite0": EfficientNetLiteConfig,
    }[family]
    return int(config_class.from_pretrained(folder).image_size)  # a whole CLIP/SigLIP folder: its vision config


def _pooling(family: str, folder: Path) -> str:
    """ViT's pooler (dense + tanh on the class token) only when the folder has its weights (google's in21k ViTs do;
    ViTForImageClassification folders do not): else the class token after the final LayerNorm."""
    if family != "vit":
        return "pooler"
    from safetensors import safe_open

    weights, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.is_file():  # a sharded folder: the index names every weight
        names = list(_json(index).get("weight_map", {}))
    elif weights.is_file():
        with safe_open(str(weights), "pt") as header:
            names = list(header.keys())
    else:
        names = []
    return "pooler" if any(k.startswith(("pooler.", "vit.pooler.")) for k in names) else "cls"


def _triple(values, folder: Path, key: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{folder}: {key} {values} must have 3 values (R, G, B)")
    return values


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot be read as JSON ({error}); re-save the folder with save_pretrained") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
