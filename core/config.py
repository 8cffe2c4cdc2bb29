"""Model configuration: small frozen dataclasses, composed once, read only by the builders.

Presets are data (``core/presets/*.json``); :func:`load_config` turns a preset name or a JSON file into a
:class:`SynergyConfig` and applies overrides checked against the dataclass fields.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from synergy.suggest import did_you_mean

PRESET_DIR = Path(__file__).parent / "presets"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTowerConfig:
    """A CLIP-vision tower built from these sizes, or a tower of any image family (CLIP / SigLIP vision, ViT, DINOv2,
    EfficientNet-Lite0) from the local folder ``pretrained`` (saved with ``save_pretrained``; no hub downloads).

    The preprocessing (``image_size`` .. ``rescale_factor``; see ``runtime.manifest.ImagePreprocessing``) and the
    pooling are then the folder's own, read from its processor (:mod:`synergy.core.image_folder`), and the sizes
    here are unused; the built model's config records the values used. ``pooling``: "pooler" (the tower's
    pooler_output: CLIP's post-LayerNorm class token, SigLIP's attention-pool head, ViT's pooler, DINOv2's normed
    class token, EfficientNet's average) or "cls" (the first token's final state); None: the folder's choice."""

    image_size: int = 224  # the tower's input side: after the resize and the center crop
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize: str = "shortest_edge"  # "shortest_edge" (then a center crop) | "exact" (resize_size x resize_size)
    resize_size: int | None = None  # before the crop; None: image_size (DINOv2 resizes to 256, then crops 224)
    resample: str = "bicubic"  # Pillow's filter: bicubic, bilinear, nearest, lanczos, box, hamming
    rescale_factor: float = 1 / 255
    pooling: str | None = None
    pretrained: str | None = None

    def preprocessing(self):
        """The runtime's ``ImagePreprocessing`` of this tower: what training, evaluation and the bundle apply."""
        from synergy.runtime.manifest import ImagePreprocessing

        return ImagePreprocessing(
            self.image_size,
            tuple(self.mean),
            tuple(self.std),
            self.resize,
            self.resize_size or self.image_size,
            self.resample,
            self.rescale_factor,
        )


@dataclass(frozen=True)
class TextTowerConfig:
    """A RoBERTa encoder built from these sizes, or any transformers ``AutoModel`` encoder from the local folder
    ``pretrained`` (its own tokenizer.json; the sizes here are then unused). ``pooling``: "cls" (the first token's
    final state) or "mean" (over the attention mask); None: what the folder's sentence-transformers Pooling config
    says, else "cls". ``max_length``: for a pretrained folder, the folder's own limit replaces it
    (:mod:`synergy.core.text_folder`); the built model's config records the values used."""

    vocab_size: int = 50265
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    pretrained: str | None = None
    pooling: str | None = None


@dataclass(frozen=True)
class AudioTowerConfig:
    """The audio tower and its front end, computed inside the model from the raw waveform. From scratch: an AST over
    a kaldi log-mel of these sizes. From the local folder ``pretrained``, its family (config.json's model_type,
    :mod:`synergy.core.audio_families`): AST (set n_mels / num_frames to the tower's), wav2vec2 / HuBERT (the
    folder's preprocessor_config.json replaces ``sample_rate`` and, when it is None, ``waveform_normalize``) or the
    aisfx CNN (its 44.1 kHz rate and its 2.32 s block replace ``sample_rate`` and ``clip_seconds``); the built
    model's config records the values used."""

    sample_rate: int = 16_000
    clip_seconds: float = 10.24
    n_mels: int = 128
    num_frames: int = 1024
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    mean: float = -4.2677393  # AudioSet statistics of AST's feature extractor
    std: float = 4.5689974
    # frames past a clip's end: "ast" (log-mel 0, as AST's extractor pads) or "silence" (the log-mel of silence);
    # None (the default) settles to "ast" for a pretrained tower (exact parity with transformers' AST pipeline) and
    # "silence" for one trained from scratch (issue 24: log-0 padding cost 7 points on unseen speakers)
    padding: str | None = None
    pretrained: str | None = None
    waveform_normalize: bool | None = None  # wav2vec2 / HuBERT: zero mean, unit variance per clip (do_normalize)


@dataclass(frozen=True)
class SynergyConfig:
    embed_dim: int = 512
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    audio: AudioTowerConfig = field(default_factory=AudioTowerConfig)
    # any transformers AttentionInterface name; "synergy" = our fused kernel, 0.38-0.92x SDPA on an H200
    # (benchmarks/README.md "On an H200"), so not the default
    attn_implementation: str = "sdpa"
    prompt_templates: tuple[str, ...] = ("a {}.", "a photo of a {}.", "the sound of a {}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_TOWERS = {"image": ImageTowerConfig, "text": TextTowerConfig, "audio": AudioTowerConfig}


class ConfigError(ValueError):
    """An unknown preset, an unknown key or a value of the wrong kind in a model config."""


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def checked_fields(cls, data: dict, where: str, exclude=()) -> dict:
    """``data`` checked against the dataclass ``cls`` -> its values, ready for ``cls(**values)``: a key that is not a
    field (or is in ``exclude``) fails naming ``where`` and the valid keys, a value of the wrong type fails naming the
    expected one (:func:`check_value`), and a field that is itself a dataclass takes an object of its fields, checked
    the same way under ``where.<key>``. The one check of config dicts: model, training and MMR configs use it."""
    names = sorted(f.name for f in dataclasses.fields(cls) if f.name not in exclude)
    unknown = sorted(set(data) - set(names))
    if unknown:
        hint = did_you_mean(unknown[0], names)
        raise ConfigError(f"{where}: unknown key(s) {unknown}{hint}; valid keys: {names}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, (dict, hint)):
                raise ConfigError(f"{where}.{key}: expected an object of {hint.__name__} fields, got {value!r}")
            value = value if isinstance(value, hint) else hint(**checked_fields(hint, value, f"{where}.{key}"))
        else:
            value = check_value(value, hint, f"{where}: {key}")
        values[key] = value
    return values


def check_value(value, hint, where: str):
    """``value`` if it is of the type ``hint`` (int, float, bool, str, dict, ``X | None``, ``tuple[X, ...]``,
    ``tuple[X, Y]``; lists become tuples, ints pass as floats), else a ConfigError naming the expected type."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    hint = next(h for h in options if h is not type(None))
    if typing.get_origin(hint) is tuple:
        kinds = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            kinds = kinds[:1] * len(value) if kinds[-1] is Ellipsis else kinds
            if len(kinds) == len(value):
                return tuple(check_value(v, k, f"{where}[{i}]") for i, (v, k) in enumerate(zip(value, kinds)))
        expected = f"a list of {kinds[0].__name__}" + ("" if kinds[-1] is Ellipsis else f" ({len(kinds)} values)")
    else:
        accepted = (int, float) if hint is float else (hint,)
        if isinstance(value, accepted) and (hint is bool or not isinstance(value, bool)):
            return value
        expected = hint.__name__
    optional = " or null" if type(None) in options else ""
    raise ConfigError(f"{where}: expected {expected}{optional}, got {type(value).__name__} {value!r}")


def config_from_dict(data: dict, where: str = "config") -> SynergyConfig:
    return SynergyConfig(**checked_fields(SynergyConfig, data, where))


def load_config(preset_or_path: str | Path | SynergyConfig, **overrides) -> SynergyConfig:
    """A preset name (``list_presets()``), a path to a JSON file, or a config; then ``overrides``.

    Overrides use the field names, with ``__`` or ``.`` into a tower: ``embed_dim=256``,
    ``audio__layers=2`` or ``**{"audio.layers": 2}``.
    """
    if isinstance(preset_or_path, SynergyConfig):
        data, where = preset_or_path.to_dict(), "config"
    else:
        path = Path(preset_or_path)
        if path.suffix == ".json" and path.is_file():
            data, where = json.loads(path.read_text()), str(path)
        elif (PRESET_DIR / f"{preset_or_path}.json").is_file():
            data, where = json.loads((PRESET_DIR / f"{preset_or_path}.json").read_text()), f"preset {preset_or_path!r}"
        else:
            hint = did_you_mean(str(preset_or_path), list_presets())
            raise ConfigError(
                f"unknown preset {str(preset_or_path)!r}{hint}; presets: {list_presets()} (or a .json file)"
            )
    for key, value in overrides.items():
        parts = key.replace("__", ".").split(".")
        target = data
        for part in parts[:-1]:
            if part not in _TOWERS:
                raise ConfigError(f"override {key!r}: {part!r} is not a tower; towers: {sorted(_TOWERS)}")
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return config_from_dict(data, where)
