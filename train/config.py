"""Training configuration: a JSON file plus ``--set key=value`` overrides, checked against the dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TrainConfig:
    model: str = "small"  # preset name or model JSON
    model_overrides: dict = field(default_factory=dict)  # e.g. {"audio.layers": 2}; `--set model.audio.layers=2`
    data: str = "data/synth/train.csv"
    val_data: str | None = "data/synth/val.csv"
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


def _coerce(value: str, current, optional: bool):
    """``value`` in the type of ``current``; ``optional`` fields (``str | None``) also take none, null or empty."""
    if optional and value.lower() in ("none", "null", ""):
        return None
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def load_train_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """``overrides``: ``key=value`` strings; ``model.<tower>.<field>=v`` or ``model.embed_dim=v`` go to the model."""
    data: dict = {}
    if path is not None:
        data = json.loads(Path(path).read_text())
    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    data.setdefault("model_overrides", {})
    defaults = TrainConfig()
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        if key.startswith("model."):
            parsed = value
            for cast in (int, float):
                try:
                    parsed = cast(value)
                    break
                except ValueError:
                    continue
            data["model_overrides"][key.removeprefix("model.")] = parsed
            continue
        if key not in names or key == "model_overrides":
            raise ValueError(f"--set {key}: unknown key; valid keys: {sorted(set(names) - {'model_overrides'})}")
        try:
            optional = "None" in str(names[key].type)  # annotations are strings here (__future__)
            data[key] = _coerce(value, data.get(key, getattr(defaults, key)), optional)
        except ValueError as error:
            raise ValueError(f"--set {key}={value}: {error}") from error
    config = TrainConfig(**data)
    if config.text_mode not in ("prompt", "caption", "mixed"):
        raise ValueError(f"text_mode={config.text_mode!r}: choose prompt, caption or mixed")
    if config.on_bad_sample not in ("skip", "error"):
        raise ValueError(f"on_bad_sample={config.on_bad_sample!r}: choose skip or error")
    if config.batch_size < 1 or config.accumulation < 1 or config.batch_size % config.accumulation:
        raise ValueError(f"batch_size {config.batch_size} must be a positive multiple of accumulation")
    return config
