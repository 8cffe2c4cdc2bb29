"""The bundle format: one definition, read by the runtime and written by the exporter.

A bundle is a folder::

    manifest.json  image.onnx  text.onnx  audio.onnx  (or *.plan for TensorRT)  tokenizer.json

Graph contract (every backend): inputs are ``pixel_values`` [B,3,H,W] float32, ``input_ids`` + ``attention_mask``
[B,L] int64, ``waveform`` [B,T] float32 at the model's sample rate (rows zero-padded) + ``waveform_lengths`` [B]
int64 (each row's real samples); the output is ``embedding`` [B,D] float32, L2-normalised.

Format versions: 1 fed the audio graph a waveform only (short clips were zero-padded as samples, which is not
how AST pads: wrong embeddings for clips shorter than one clip); 2 adds ``waveform_lengths``. A version-1 bundle
is refused with the command that re-exports it. This module imports only the standard library (it is the
runtime's ground floor).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 2
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
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


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
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        version = data.get("format_version")
        if not isinstance(version, int):
            raise BundleError("manifest.json has no integer 'format_version'; this is not a Synergy bundle")
        if version < FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is older than this runtime reads ({FORMAT_VERSION}): its audio graph "
                "pads short clips as samples instead of in the log-mel domain, which gives wrong embeddings; "
                "re-export it from its checkpoint: synergy export CHECKPOINT --out NEW_BUNDLE"
            )
        if version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is newer than this runtime reads ({FORMAT_VERSION}); "
                "upgrade synergy or re-export the bundle with this version"
            )
        try:
            towers = {
                name: TowerSpec(
                    file=t["file"],
                    inputs=tuple(TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in t["inputs"]),
                    outputs=tuple(TensorSpec(o["name"], o["dtype"], tuple(o["shape"])) for o in t["outputs"]),
                    precision=t.get("precision", "fp32"),
                )
                for name, t in data["towers"].items()
            }
            image, audio, text = data["image"], data["audio"], data["text"]
            manifest = cls(
                embed_dim=int(data["embed_dim"]),
                logit_scales={k: float(v) for k, v in data["logit_scales"].items()},
                towers=towers,
                image=ImagePreprocessing(int(image["size"]), tuple(image["mean"]), tuple(image["std"])),
                audio=AudioPreprocessing(int(audio["sample_rate"]), float(audio["clip_seconds"])),
                text=TextPreprocessing(int(text["max_length"]), tuple(text["prompt_templates"])),
                backend=data.get("backend", "onnx"),
                precision=data.get("precision", "fp32"),
                tokenizer=data.get("tokenizer", "tokenizer.json"),
                files=dict(data.get("files", {})),
                versions=dict(data.get("versions", {})),
                extra=dict(data.get("extra", {})),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"manifest.json is malformed: {error!r}; re-export the bundle") from error
        audio = manifest.towers.get("audio")
        if audio is not None and tuple(t.name for t in audio.inputs) != AUDIO_INPUTS:
            names = [t.name for t in audio.inputs]
            raise BundleError(f"manifest.json: the audio tower's inputs are {names}, expected {list(AUDIO_INPUTS)}")
        return manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    (Path(bundle) / MANIFEST_NAME).write_text(manifest.to_json() + "\n")


def load_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read and validate ``bundle/manifest.json``; with ``verify``, check that every listed file exists inside
    the bundle and has the recorded sha256."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a folder; pass the bundle folder that `synergy export` wrote")
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST_NAME}; this is not a Synergy bundle (run `synergy export`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: not valid JSON ({error}); re-export the bundle") from error
    manifest = Manifest.from_dict(data)
    if verify:
        root = bundle.resolve()
        for rel, expected in manifest.files.items():
            file = (bundle / rel).resolve()
            if root not in file.parents:
                raise BundleError(f"{bundle}: manifest lists {rel!r}, which is outside the bundle; refusing it")
            if not file.is_file():
                raise BundleError(f"{bundle}: {rel} is missing; the bundle is incomplete, re-export it")
            if sha256_file(file) != expected:
                raise BundleError(f"{bundle}: {rel} has changed since export (sha256 mismatch); re-export the bundle")
    return manifest
