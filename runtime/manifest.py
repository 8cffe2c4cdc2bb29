"""The bundle format's schema: the manifest dataclasses and their validation, one definition for runtime and export.

A bundle is a folder::

    manifest.json  image.onnx  text.onnx  audio.onnx  (or *.plan for TensorRT)  tokenizer.json

Graph contract (every backend): inputs are ``pixel_values`` [B,3,H,W] float32, ``input_ids`` + ``attention_mask``
[B,L] int64, ``waveform`` [B,T] float32 at the model's sample rate (rows zero-padded) + ``waveform_lengths`` [B]
int64 (each row's real samples); the output is ``embedding`` [B,D] float32, L2-normalised.

Format versions: 1 fed the audio graph a waveform only (short clips were zero-padded as samples, which is not
how AST pads: wrong embeddings for clips shorter than one clip); 2 adds ``waveform_lengths``; 3 describes the image
preprocessing in full (``image.resize``, ``resize_size``, ``resample``, ``rescale_factor``: SigLIP, ViT, DINOv2 and
EfficientNet-Lite0 do not preprocess as CLIP does) and may list the pretrained weights' ``licences``. A version-1
bundle is refused with the command that re-exports it; a version-2 bundle reads as CLIP's preprocessing (what every
version-2 bundle used); a runtime that reads only version 2 refuses a version-3 bundle rather than preprocess its
images as CLIP's. This module imports only the standard library and reads no file
(it is the runtime's ground floor); ``bundle.py`` reads a bundle folder from disk and checks it against this.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 3
MIN_FORMAT_VERSION = 2  # version 1's audio graph padded short clips wrongly; 2 reads with CLIP's image preprocessing
AUDIO_INPUTS = ("waveform", "waveform_lengths")
MANIFEST_NAME = "manifest.json"
MODALITIES = ("image", "text", "audio")
PAIRS = ("image_text", "text_audio", "audio_image")


class BundleError(ValueError):
    """A bundle folder that cannot be used: missing, changed, or from a newer format."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple  # ints for fixed dims, strings for dynamic ones ("batch", "length", "samples")


@dataclass(frozen=True)
class TowerSpec:
    file: str  # relative to the bundle folder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"  # weights/compute precision; inputs and outputs stay float32


@dataclass(frozen=True)
class ImagePreprocessing:
    """What ``runtime/image.py`` does to a decoded RGB image: resize (``resize`` "shortest_edge": the shortest edge to
    ``resize_size``; "exact": to ``resize_size`` x ``resize_size``) with the Pillow filter ``resample``, center crop
    ``size`` x ``size`` (the graph's input), multiply by ``rescale_factor``, then ``(x - mean) / std``. The defaults
    are CLIP's processor, what a version-2 bundle (size, mean and std only) means."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest_edge"
    resize_size: int | None = None  # None: ``size``
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if self.resize_size is None:
            object.__setattr__(self, "resize_size", self.size)


@dataclass(frozen=True)
class AudioPreprocessing:
    sample_rate: int
    clip_seconds: float


@dataclass(frozen=True)
class TextPreprocessing:
    max_length: int
    prompt_templates: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    embed_dim: int
    logit_scales: dict  # {"image_text": s, "text_audio": s, "audio_image": s}: exp'd, as used in softmax
    towers: dict  # modality -> TowerSpec
    image: ImagePreprocessing
    audio: AudioPreprocessing
    text: TextPreprocessing
    backend: str = "onnx"  # "onnx" | "tensorrt"
    precision: str = "fp32"
    tokenizer: str = "tokenizer.json"
    files: dict = field(default_factory=dict)  # relative path -> sha256 of every file in the bundle
    versions: dict = field(default_factory=dict)  # library versions that produced the bundle
    extra: dict = field(default_factory=dict)  # exporter's report (verification numbers, TensorRT profiles, ...)
    # tower -> where its pretrained weights came from and their licence: {"weights", "source", "sha256", "licence",
    # "text"} (the licence file's text, which redistributing the weights inside the bundle must carry)
    licences: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """Build and range-check a manifest from parsed JSON. Every field is checked here, when the bundle opens,
        so that a wrong value is one ``BundleError`` naming the field rather than a raw numpy/soxr/onnxruntime error
        (or a silently wrong answer: a negative logit scale flips every ranking) on the first input."""
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise BundleError(f"manifest.json is a JSON {kind}, not an object; this is not a Synergy bundle")
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise BundleError(
                f"manifest.json: format_version is {version!r}, not an integer; this is not a Synergy bundle"
            )
        if version < MIN_FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is older than this runtime reads ({MIN_FORMAT_VERSION}): its audio "
                "graph "
                "pads short clips as samples instead of in the log-mel domain, which gives wrong embeddings; "
                "re-export it from its checkpoint: synergy export --checkpoint CHECKPOINT --out NEW_BUNDLE"
            )
        if version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is newer than this runtime reads ({FORMAT_VERSION}); "
                "upgrade synergy or re-export the bundle with this version"
            )
        for key in ("embed_dim", "logit_scales", "towers", "image", "audio", "text"):
            if key not in data:
                raise BundleError(f"manifest.json has no {key!r}; re-export the bundle")
        embed_dim = _integer(data, "embed_dim", 1, MAX_EMBED_DIM)
        scales = _mapping(data, "logit_scales")
        if sorted(scales) != sorted(PAIRS):
            raise BundleError(f"manifest.json: logit_scales has keys {sorted(scales)}, expected {list(PAIRS)}")
        logit_scales = {k: _number(scales, k, MIN_LOGIT_SCALE, MAX_LOGIT_SCALE, "logit_scales.") for k in PAIRS}
        image, audio, text = _mapping(data, "image"), _mapping(data, "audio"), _mapping(data, "text")
        rate = _integer(audio, "sample_rate", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, "audio.")
        clip_seconds = _number(audio, "clip_seconds", 0.0, MAX_CLIP_SECONDS, "audio.")
        if clip_seconds * rate < rate * 25 // 1000:
            raise BundleError(
                f"manifest.json: audio.clip_seconds is {clip_seconds!r}, shorter than one 25 ms analysis frame; "
                "re-export the bundle"
            )
        templates = _sequence(text, "prompt_templates", "text.")
        if len(templates) > MAX_TEMPLATES or not all(isinstance(t, str) and len(t) <= 1000 for t in templates):
            raise BundleError(
                f"manifest.json: text.prompt_templates must be at most {MAX_TEMPLATES} strings of <= 1000 characters"
            )
        towers_data = _mapping(data, "towers")
        if not towers_data or not set(towers_data) <= set(MODALITIES):
            keys = sorted(towers_data)
            raise BundleError(f"manifest.json: towers has keys {keys}; expected some of {list(MODALITIES)}")
        manifest = cls(
            embed_dim=embed_dim,
            logit_scales=logit_scales,
            towers={name: _tower(name, spec) for name, spec in towers_data.items()},
            image=_image_preprocessing(image, version),
            audio=AudioPreprocessing(rate, clip_seconds),
            text=TextPreprocessing(_integer(text, "max_length", 2, MAX_TEXT_LENGTH, "text."), tuple(templates)),
            backend=_choice(data, "backend", ("onnx", "tensorrt"), "onnx"),
            precision=_string(data, "precision", "fp32"),
            tokenizer=relative_path(_string(data, "tokenizer", "tokenizer.json"), "tokenizer"),
            files=_files(data.get("files", {})),
            versions=_plain_mapping(data, "versions"),
            extra=_plain_mapping(data, "extra"),
            licences=_licences(data.get("licences", {})),
            format_version=version,
        )
        for name, spec in manifest.towers.items():
            dim = spec.outputs[0].shape[-1] if spec.outputs[0].shape else None
            if isinstance(dim, int) and dim != embed_dim:
                raise BundleError(
                    f"manifest.json: the {name} graph's output {spec.outputs[0].name} has {dim} features but "
                    f"embed_dim is {embed_dim}; re-export the bundle"
                )
        return manifest


# ---------------------------------------------------------------------------------------------- field checks
# Limits far outside any real model, so that only a corrupt or hostile manifest meets them.
MAX_EMBED_DIM = 65_536
MIN_LOGIT_SCALE, MAX_LOGIT_SCALE = 1e-3, 1e4  # exp'd scales: CLIP clamps at 100; <= 0 would flip or flatten answers
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000
MAX_CLIP_SECONDS = 120.0
MAX_IMAGE_SIZE = 4_096
RESIZE_MODES = ("shortest_edge", "exact")
RESAMPLE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # Pillow's, by name
MAX_LICENCE_CHARS = 100_000
MAX_MEAN, MIN_STD, MAX_STD = 10.0, 1e-3, 100.0
MAX_TEXT_LENGTH = 65_536
MAX_TEMPLATES = 1_000
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")
TOWER_RANKS = {"image": (4,), "text": (2, 2), "audio": (2, 1)}


def _field(container: dict, key: str, prefix: str):
    if not isinstance(container, dict) or key not in container:
        raise BundleError(f"manifest.json has no {prefix}{key}; re-export the bundle")
    return container[key]


def _integer(container: dict, key: str, low: int, high: int, prefix: str = "") -> int:
    value = _field(container, key, prefix)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BundleError(f"manifest.json: {prefix}{key} is {value!r}; expected an integer in [{low}, {high}]")
    return value


def _number(container: dict, key: str, low: float, high: float, prefix: str = "") -> float:
    """A finite number in (low, high] (low excluded: the fields this checks are scales and durations)."""
    value = _field(container, key, prefix)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        raise BundleError(f"manifest.json: {prefix}{key} is {value!r}; expected a finite number in ({low:g}, {high:g}]")
    return float(value)


def _triple(container: dict, key: str, low: float, high: float, prefix: str) -> tuple[float, float, float]:
    values = _field(container, key, prefix)
    ok = isinstance(values, list) and len(values) == 3
    ok = ok and all(not isinstance(v, bool) and isinstance(v, (int, float)) and low <= v <= high for v in values)
    if not ok:
        raise BundleError(
            f"manifest.json: {prefix}{key} is {values!r}; expected 3 numbers (R, G, B) in [{low:g}, {high:g}]"
        )
    return tuple(float(v) for v in values)


def _image_preprocessing(image: dict, version: int) -> ImagePreprocessing:
    """``image`` of the manifest; a version-2 bundle has only size, mean and std, which mean CLIP's processor."""
    size = _integer(image, "size", 1, MAX_IMAGE_SIZE, "image.")
    mean = _triple(image, "mean", -MAX_MEAN, MAX_MEAN, "image.")
    std = _triple(image, "std", MIN_STD, MAX_STD, "image.")
    if version < 3:
        return ImagePreprocessing(size, mean, std, "shortest_edge", size, "bicubic", 1 / 255)
    resize = _field(image, "resize", "image.")
    if resize not in RESIZE_MODES:
        raise BundleError(f"manifest.json: image.resize is {resize!r}; expected one of {list(RESIZE_MODES)}")
    # the crop takes size x size out of the resized image: a smaller resize would leave nothing to crop
    resize_size = _integer(image, "resize_size", size, MAX_IMAGE_SIZE, "image.")
    resample = _field(image, "resample", "image.")
    if resample not in RESAMPLE_FILTERS:
        raise BundleError(f"manifest.json: image.resample is {resample!r}; expected one of {list(RESAMPLE_FILTERS)}")
    rescale = _number(image, "rescale_factor", 0.0, 1.0, "image.")
    return ImagePreprocessing(size, mean, std, resize, resize_size, resample, rescale)


def _licences(value) -> dict:
    if not isinstance(value, dict) or not set(value) <= set(MODALITIES):
        raise BundleError(f"manifest.json: licences must map towers {list(MODALITIES)} to objects")
    for tower, entry in value.items():
        ok = isinstance(entry, dict) and all(
            isinstance(k, str) and isinstance(v, str) and len(v) <= MAX_LICENCE_CHARS for k, v in entry.items()
        )
        if not ok or len(entry) > 16:
            raise BundleError(
                f"manifest.json: licences.{tower} must be an object of at most 16 strings of <= "
                f"{MAX_LICENCE_CHARS} characters"
            )
    return {tower: dict(entry) for tower, entry in value.items()}


def _mapping(container: dict, key: str, prefix: str = "") -> dict:
    value = _field(container, key, prefix)
    if not isinstance(value, dict):
        raise BundleError(f"manifest.json: {prefix}{key} is a {type(value).__name__}; expected an object")
    return value


def _plain_mapping(container: dict, key: str) -> dict:
    return dict(_mapping(container, key)) if key in container else {}


def _sequence(container: dict, key: str, prefix: str = "") -> list:
    value = _field(container, key, prefix)
    if not isinstance(value, list):
        raise BundleError(f"manifest.json: {prefix}{key} is a {type(value).__name__}; expected a list")
    return value


def _string(container: dict, key: str, default: str) -> str:
    value = container.get(key, default)
    if not isinstance(value, str) or not value:
        raise BundleError(f"manifest.json: {key} is {value!r}; expected a non-empty string")
    return value


def _choice(container: dict, key: str, choices: tuple, default: str) -> str:
    value = container.get(key, default)
    if value not in choices:
        raise BundleError(f"manifest.json: {key} is {value!r}; expected one of {list(choices)}")
    return value


def relative_path(value, field_name: str) -> str:
    """A path inside the bundle: relative, '/'-separated, no '..' and no empty parts. (Symlinks are checked when
    the file is opened, against the resolved bundle folder.)"""
    parts = value.split("/") if isinstance(value, str) else []
    if (
        not parts
        or value.startswith("/")
        or "\\" in value
        or "\0" in value
        or any(part in ("", ".", "..") for part in parts)
        or ":" in parts[0]
    ):
        raise BundleError(
            f"manifest.json: {field_name} is {value!r}; every file must be a relative path inside the bundle "
            "(no absolute paths, no '..'); refusing the bundle"
        )
    return value


def _files(value) -> dict:
    if not isinstance(value, dict):
        raise BundleError(f"manifest.json: files is a {type(value).__name__}; expected {{path: sha256}}")
    for rel, digest in value.items():
        relative_path(rel, f"files entry {rel!r}")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BundleError(f"manifest.json: files[{rel!r}] is {digest!r}; expected a sha256 (64 lowercase hex)")
    return dict(value)


def _tensor(name: str, spec, where: str) -> TensorSpec:
    if not isinstance(spec, dict):
        raise BundleError(f"manifest.json: {where} is a {type(spec).__name__}; expected an object")
    tensor_name, dtype, shape = _field(spec, "name", where + "."), _field(spec, "dtype", where + "."), spec.get("shape")
    if not isinstance(tensor_name, str) or not tensor_name:
        raise BundleError(f"manifest.json: {where}.name is {tensor_name!r}; expected a string")
    if dtype not in TENSOR_DTYPES:
        raise BundleError(f"manifest.json: {where}.dtype is {dtype!r}; expected one of {list(TENSOR_DTYPES)}")
    dims_ok = isinstance(shape, list) and all(
        (isinstance(d, int) and not isinstance(d, bool) and d > 0) or (isinstance(d, str) and d) for d in shape
    )
    if not dims_ok:
        raise BundleError(f"manifest.json: {where}.shape is {shape!r}; expected positive integers or dim names")
    return TensorSpec(tensor_name, dtype, tuple(shape))


def _tower(name: str, data) -> TowerSpec:
    where = f"towers.{name}"
    if not isinstance(data, dict):
        raise BundleError(f"manifest.json: {where} is a {type(data).__name__}; expected an object")
    inputs = [_tensor(name, t, f"{where}.inputs[{i}]") for i, t in enumerate(_sequence(data, "inputs", where + "."))]
    outputs = [_tensor(name, t, f"{where}.outputs[{i}]") for i, t in enumerate(_sequence(data, "outputs", where + "."))]
    ranks = TOWER_RANKS[name]
    if tuple(len(t.shape) for t in inputs) != ranks:
        got = [f"{t.name}{list(t.shape)}" for t in inputs]
        raise BundleError(f"manifest.json: {where}.inputs are {got}; the {name} graph takes inputs of ranks {ranks}")
    if name == "audio" and tuple(t.name for t in inputs) != AUDIO_INPUTS:
        raise BundleError(
            f"manifest.json: the audio tower's inputs are {[t.name for t in inputs]}, expected {list(AUDIO_INPUTS)}"
        )
    if name == "image" and isinstance(inputs[0].shape[1], int) and inputs[0].shape[1] != 3:
        raise BundleError(f"manifest.json: {where} takes {inputs[0].shape[1]} channels; the runtime feeds RGB (3)")
    if len(outputs) != 1 or len(outputs[0].shape) != 2 or outputs[0].dtype not in ("float32", "float16"):
        raise BundleError(f"manifest.json: {where}.outputs must be one float embedding [batch, embed_dim]")
    file = relative_path(_field(data, "file", where + "."), f"{where}.file")
    return TowerSpec(file, tuple(inputs), tuple(outputs), _string(data, "precision", "fp32"))
