"""Checkpoint = a folder: ``config.json``, ``model.safetensors``, ``tokenizer.json`` (+ ``train_state/``).

Saves are atomic: everything is written into a sibling temp folder, fsynced, then renamed over the old one, so an
interrupted save or a full disk never leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from synergy.core.config import ConfigError, config_from_dict
from synergy.core.model import SynergyModel
from synergy.core.towers import tower_hf_config

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
TRAIN_STATE = "train_state"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or corrupt."""


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(
    folder: str | Path, model: SynergyModel, tokenizer: Tokenizer, train_state: dict | None = None
) -> Path:
    """Write ``folder`` atomically. ``train_state``: tensors/numbers for resume, saved as ``train_state/state.pt``
    (loaded with ``weights_only=True``)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        config = {
            "synergy": model.config.to_dict(),
            "towers": {
                "image": tower_hf_config(model.image_tower),
                "text": tower_hf_config(model.text_tower),
                "audio": tower_hf_config(model.audio_tower),
            },
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        if train_state is not None:
            (tmp / TRAIN_STATE).mkdir()
            torch.save(train_state, tmp / TRAIN_STATE / "state.pt")
        _fsync_tree(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_checkpoint_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder (expected {', '.join(CHECKPOINT_FILES)})")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder}: incomplete checkpoint, missing {', '.join(missing)}; point to a folder written by "
            "`synergy train` (e.g. runs/demo/checkpoint)"
        )
    try:
        data = json.loads((folder / "config.json").read_text())
        return {"synergy": data["synergy"], "towers": data["towers"]}
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder}/config.json is corrupt ({error!r}); the checkpoint cannot be used") from error


def load_checkpoint(folder: str | Path, attn_implementation: str | None = None) -> tuple[SynergyModel, Tokenizer]:
    """Rebuild the model from ``config.json`` (no pretrained folders needed) and load its weights."""
    folder = Path(folder)
    data = read_checkpoint_config(folder)
    if attn_implementation is not None:
        data["synergy"]["attn_implementation"] = attn_implementation
    try:
        config = config_from_dict(data["synergy"], f"{folder}/config.json")
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{folder}/config.json does not describe a Synergy model: {error}") from error
    model = SynergyModel(config, hf_configs=data["towers"])
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{folder}/model.safetensors is corrupt or truncated ({error}); re-save it") from error
    result = model.load_state_dict(state, strict=False)
    # the front end's DFT/mel matrices are rebuilt from the config, never read from the file
    missing = [k for k in result.missing_keys if not k.startswith("audio_frontend.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{folder}/model.safetensors does not match its config.json: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as error:  # tokenizers raises a bare Exception for malformed JSON
        raise CheckpointError(f"{folder}/tokenizer.json is corrupt ({error})") from error
    return model, tokenizer


def load_train_state(folder: str | Path) -> dict | None:
    path = Path(folder) / TRAIN_STATE / "state.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
