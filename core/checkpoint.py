"""Checkpoint = a folder: ``config.json``, ``model.safetensors``, ``tokenizer.json`` (+ ``train_state/``).

Saves are atomic (:mod:`synergy.core.atomic_folder`): a kill at any instant or a full disk leaves the last complete
checkpoint, which :func:`recover_checkpoint` puts back in place before a resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from tokenizers import Tokenizer

from synergy.core.atomic_folder import DiskFullError, atomic_folder, recover_folder
from synergy.core.config import ConfigError, config_from_dict
from synergy.core.model import SynergyModel
from synergy.core.towers import tower_hf_config

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
TRAIN_STATE = "train_state"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or corrupt."""


def save_checkpoint(
    folder: str | Path, model: SynergyModel, tokenizer: Tokenizer, train_state: dict | None = None
) -> Path:
    """Write ``folder`` atomically (:mod:`synergy.core.atomic_folder`). ``train_state``: tensors/numbers for resume,
    saved as ``train_state/state.pt`` (loaded with ``weights_only=True``).

    Raises :class:`CheckpointError` when the disk fills up; the previous checkpoint is then left as it was."""
    folder = Path(folder)
    config = {
        "synergy": model.config.to_dict(),
        "towers": {
            "image": tower_hf_config(model.image_tower),
            "text": tower_hf_config(model.text_tower),
            "audio": tower_hf_config(model.audio_tower),
        },
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    try:
        with atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            # serialised in memory and written by Python: safetensors' own writer reports a full disk as a
            # SafetensorError without the errno, and the error must say "out of space"
            (tmp / "model.safetensors").write_bytes(save_safetensors(state, metadata={"format": "pt"}))
            (tmp / "tokenizer.json").write_text(tokenizer.to_str(pretty=True))
            if train_state is not None:
                (tmp / TRAIN_STATE).mkdir()
                with open(tmp / TRAIN_STATE / "state.pt", "wb") as f:
                    torch.save(train_state, f)
    except DiskFullError as error:
        kept = f"the previous checkpoint in {folder} is intact" if folder.is_dir() else "nothing was saved"
        raise CheckpointError(
            f"{error.strerror}; {kept}. Free space on {folder.parent} (or point `out` elsewhere) and continue "
            "with `synergy train --resume`"
        ) from error
    return folder


def recover_checkpoint(folder: str | Path) -> None:
    """After a killed save: bring back the last complete checkpoint and remove half-written temp folders."""
    recover_folder(folder)


def read_checkpoint_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir() and folder.with_name(f".{folder.name}.old").is_dir():
        raise CheckpointError(
            f"{folder}: a save was interrupted; the last complete checkpoint is in .{folder.name}.old and "
            "`synergy train --resume` puts it back"
        )
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
