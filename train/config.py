"""Training configuration: a JSON file plus ``--set key=value`` overrides, checked against the dataclass: unknown
keys, values of the wrong type (the expected type in the message) and values out of range fail here, at the
boundary, not deep inside a run."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from synergy.core.config import ConfigError, checked_fields, load_config
from synergy.runtime.prompts import check_template
from synergy.suggest import did_you_mean

NO_DATA = (
    "no training data: set `data` in the config file or pass --set data=path/to/train.csv (a CSV with columns "
    "img_path,wav_path,label,caption; paths in it are relative to the CSV's folder). `synergy data synth --out "
    "data/synth` writes a synthetic one"
)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "small"  # preset name or model JSON
    model_overrides: dict = field(default_factory=dict)  # e.g. {"audio.layers": 2}; `--set model.audio.layers=2`
    data: str | None = None  # the training manifest (required)
    val_data: str | None = None  # evaluated every eval_every steps and at the end
    out: str = "runs/train"
    text_mode: str = "mixed"  # prompt | caption | mixed
    batch_size: int = 64  # the global contrastive batch (all processes, all accumulation steps)
    accumulation: int = 1  # micro-batches per step, with cached-embedding gradients: negatives stay global
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    clip_norm: float = 1.0
    seed: int = 0
    workers: int = 1
    eval_every: int = 0  # 0: only at the end
    save_every: int = 200
    on_bad_sample: str = "skip"  # skip | error
    # CLIP4VLA's intra-audio contrast: + weight x NT-Xent(clip, its SpecAugment copy) at scale 1/0.07; 0: off
    audio_intra_weight: float = 0.0
    # speed perturbation (Kaldi's recipe for unseen speakers): each training clip is resampled by a factor drawn from
    # U(1 - r, 1 + r), which moves pitch and tempo together as another voice or speaking rate would; 0: off
    audio_speed_perturb: float = 0.0
    # LiT: towers frozen in eval mode, their features computed once per input (synergy.train.locked_features);
    # `--set lock=text,image`. unlock_last_layers {"text": 2}: a locked tower's last 2 layers train (no cache then)
    lock: tuple[str, ...] = ()
    unlock_last_layers: dict = field(default_factory=dict)


def _coerce(value: str, hint, where: str):
    """A ``--set`` string in the field's type; optional fields (``str | None``) also take none, null or empty."""
    if typing.get_origin(hint) is tuple:  # `--set lock=text,image`
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if hint is dict:  # `--set 'unlock_last_layers={"text": 2}'`
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {value!r}")
        return parsed
    options = typing.get_args(hint) or (hint,)
    if type(None) in options and value.lower() in ("none", "null", ""):
        return None
    kind = next(h for h in options if h is not type(None))
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    return value


def _model_value(value: str):
    """``--set model.x=v``: JSON where it parses (numbers, lists, true/false, null), else the string itself; the
    model config checks the type."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def load_train_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """``overrides``: ``key=value`` strings; ``model.<tower>.<field>=v`` or ``model.embed_dim=v`` go to the model."""
    data: dict = {}
    if path is not None:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of training keys, got {type(data).__name__}")
    data = checked_fields(TrainConfig, data, str(path))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    data["model_overrides"] = dict(data.get("model_overrides", {}))
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        if key.startswith("model."):
            data["model_overrides"][key.removeprefix("model.")] = _model_value(value)
            continue
        if key not in names or key == "model_overrides":
            valid = sorted(names - {"model_overrides"})
            raise ConfigError(f"--set {key}: unknown key{did_you_mean(key, valid)}; valid keys: {valid}")
        data[key] = _coerce(value, hints[key], f"--set {key}={value}")
    config = TrainConfig(**data)
    check_train_config(config)
    return config


def check_train_config(config: TrainConfig, world: int = 1) -> None:
    """Ranges and choices; the types were checked where the values came in. ``world``: the number of processes
    (torchrun's WORLD_SIZE; 1 without it): each takes ``batch_size / world`` rows per step, in ``accumulation``
    micro-batches."""
    if not config.data:
        raise ConfigError(NO_DATA)
    if config.text_mode not in ("prompt", "caption", "mixed"):
        raise ConfigError(f"text_mode={config.text_mode!r}: choose prompt, caption or mixed")
    if config.on_bad_sample not in ("skip", "error"):
        raise ConfigError(f"on_bad_sample={config.on_bad_sample!r}: choose skip or error")
    if config.batch_size < 1 or config.accumulation < 1 or config.batch_size % (world * config.accumulation):
        # every process needs whole, non-empty micro-batches of one size: the DDP ranks run the same collectives
        unit = world * max(1, config.accumulation)
        raise ConfigError(
            f"batch_size {config.batch_size} must be a positive multiple of processes {world} x accumulation "
            f"{config.accumulation} = {unit} (each process splits its batch_size / {world} rows into "
            f"{config.accumulation} micro-batches); use batch_size={max(unit, config.batch_size // unit * unit)}"
        )
    for key in ("steps", "save_every"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}={getattr(config, key)}: must be at least 1")
    for key in ("eval_every", "warmup_steps", "workers", "audio_intra_weight"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key}={getattr(config, key)}: must be 0 or more")
    if not 0 <= config.audio_speed_perturb < 0.5:
        raise ConfigError(
            f"audio_speed_perturb={config.audio_speed_perturb}: must be in [0, 0.5) (0.1 resamples clips by 0.9-1.1x)"
        )
    _check_lock(config)
    model = load_config(config.model, **config.model_overrides)  # the preset and the model.* overrides, types included
    for template in model.prompt_templates:  # filled by prompts.fill_prompt in training, export and the runtime
        try:
            check_template(template)
        except ValueError as error:
            raise ConfigError(f"model.prompt_templates: {error}; write the label as {{}} or {{label}}") from error


def _check_lock(config: TrainConfig) -> None:
    towers = ("image", "text", "audio")
    unknown = [name for name in config.lock if name not in towers]
    if unknown or len(set(config.lock)) != len(config.lock):
        raise ConfigError(f"lock={list(config.lock)}: name each of {', '.join(towers)} at most once")
    for name, layers in config.unlock_last_layers.items():
        if name not in config.lock:
            raise ConfigError(
                f"unlock_last_layers.{name}: only a locked tower has layers to unlock; lock={list(config.lock)}"
            )
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
            raise ConfigError(f"unlock_last_layers.{name}={layers!r}: expected a number of layers, 0 or more")
    if "audio" in config.lock and not config.unlock_last_layers.get("audio") and config.audio_intra_weight:
        raise ConfigError(
            "audio_intra_weight trains the audio tower on SpecAugment copies, but lock holds it fixed; set "
            "audio_intra_weight=0 or unlock some of its layers (unlock_last_layers)"
        )
