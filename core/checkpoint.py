"""Checkpoint = a folder: ``config.json``, ``model.safetensors``, ``tokenizer.json`` (+ ``train_state/``).

Saves are atomic (:mod:`synergy.core.atomic_folder`): a kill at any instant or a full disk leaves the last complete
checkpoint, which :func:`recover_checkpoint` puts back in place before a resume.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from tokenizers import Tokenizer

from synergy.core.atomic_folder import DiskFullError, atomic_folder, recover_folder
from synergy.core.config import ConfigError, config_from_dict
from synergy.core.model import SynergyModel
from synergy.core.towers import build_audio_tower, build_image_tower, build_text_tower, tower_hf_config

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
TRAIN_STATE = "train_state"
TOWERS = ("image", "text", "audio")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or corrupt."""


def save_checkpoint(
    folder: str | Path, model: SynergyModel, tokenizer: Tokenizer, train_state: dict | None = None
) -> Path:
    """Write ``folder`` atomically (:mod:`synergy.core.atomic_folder`). ``train_state``: tensors/numbers for resume,
    saved as ``train_state/state.pt`` (loaded with ``weights_only=True``).

    Raises :class:`CheckpointError` when the disk fills up; the previous checkpoint is then left as it was."""
    folder = Path(folder)
    towers, folder_keys = {}, {}
    for name in TOWERS:
        towers[name], folder_keys[name] = split_folder_keys(tower_hf_config(getattr(model, f"{name}_tower")))
    config = {"synergy": model.config.to_dict(), "towers": towers, FOLDER_KEYS: folder_keys, "locked": model.locked}
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


MAX_CONFIG_BYTES = 16 << 20
# A pretrained folder's config.json may carry keys its config class does not define (MiniLM's
# "gradient_checkpointing" and "position_embedding_type", written by older transformers). from_pretrained sets them
# on the config, so the tower was built with them; the checkpoint keeps them apart, under this key, so that
# `towers.<name>` still holds only the model type's own keys and an edited key there is still refused.
FOLDER_KEYS = "tower_folder_keys"
_BOOKKEEPING_KEYS = {"_attn_implementation_autoset", "architectures", "_name_or_path"}


def _config_keys(model_type) -> set[str] | None:
    """The keys a transformers config of ``model_type`` defines; None for an unknown model type."""
    from transformers import AutoConfig

    try:
        return set(AutoConfig.for_model(model_type).to_dict()) if isinstance(model_type, str) else None
    except ValueError:
        return None


def split_folder_keys(hf_config: dict) -> tuple[dict, dict]:
    """A tower's transformers config -> (the keys its model type defines, the folder's own other keys)."""
    known = (_config_keys(hf_config.get("model_type")) or set(hf_config)) | _BOOKKEEPING_KEYS
    return (
        {k: v for k, v in hf_config.items() if k in known},
        {k: v for k, v in hf_config.items() if k not in known},
    )


def _is_plain_value(value) -> bool:
    if isinstance(value, list):
        return len(value) <= 64 and all(v is None or isinstance(v, (bool, int, float, str)) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _check_folder_keys(path: Path, data: dict) -> dict:
    """``tower_folder_keys`` (absent in checkpoints from before it) -> {tower: {key: value}}: per tower, keys its
    model type does not define (a defined key there would override the checked one) with plain JSON values."""
    folder_keys = data.get(FOLDER_KEYS, {})
    if not isinstance(folder_keys, dict) or not set(folder_keys) <= set(TOWERS):
        raise CheckpointError(
            f"{path}: {FOLDER_KEYS} must map towers {list(TOWERS)} to objects; re-save the checkpoint"
        )
    checked = {}
    for name in TOWERS:
        keys = folder_keys.get(name, {})
        if not isinstance(keys, dict):
            raise CheckpointError(f"{path}: {FOLDER_KEYS}.{name} is a {type(keys).__name__}; expected an object")
        known = (_config_keys(data["towers"][name].get("model_type")) or set()) | _BOOKKEEPING_KEYS
        clashing = sorted(set(keys) & known)
        if clashing:
            raise CheckpointError(
                f"{path}: {FOLDER_KEYS}.{name} repeats keys of the tower's own config: {clashing[:8]}; the checkpoint "
                "was edited or comes from another program"
            )
        odd = sorted(k for k, v in keys.items() if not _is_plain_value(v))
        if odd:
            raise CheckpointError(
                f"{path}: {FOLDER_KEYS}.{name} has values that are not plain JSON values: {odd[:8]}; the checkpoint "
                "was edited or comes from another program"
            )
        checked[name] = keys
    return checked


def _check_tower_config(path: Path, name: str, tower) -> None:
    """``towers.<name>`` must be a transformers config dict of a known model type with only that type's keys: an
    unknown key would be set on the config and silently ignored (or worse, read by some code path)."""
    if not isinstance(tower, dict):
        raise CheckpointError(f"{path}: towers.{name} is a {type(tower).__name__}; expected a transformers config")
    model_type = tower.get("model_type")
    known = _config_keys(model_type)
    if known is None:
        raise CheckpointError(f"{path}: towers.{name}.model_type is {model_type!r}, not a transformers model type")
    unknown = sorted(set(tower) - known - _BOOKKEEPING_KEYS)
    if unknown:
        raise CheckpointError(
            f"{path}: towers.{name} has keys that {model_type} configs do not have: {unknown[:8]}; the checkpoint "
            "was edited or comes from another program"
        )


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
    path = folder / "config.json"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path}: over {MAX_CONFIG_BYTES:,} bytes; not a Synergy config")
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CheckpointError(
            f"{path}: not UTF-8 ({error.reason} at byte {error.start}); re-save the checkpoint"
        ) from error
    except (json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path} is corrupt ({error!r}); the checkpoint cannot be used") from error
    if not isinstance(data, dict) or not isinstance(data.get("synergy"), dict):
        raise CheckpointError(f"{path}: expected an object with 'synergy' and 'towers' objects; re-save the checkpoint")
    towers = data.get("towers")
    if not isinstance(towers, dict) or sorted(towers) != sorted(TOWERS):
        got = sorted(towers) if isinstance(towers, dict) else type(towers).__name__
        raise CheckpointError(f"{path}: 'towers' must hold {list(TOWERS)} transformers configs, got {got}")
    for name in TOWERS:
        _check_tower_config(path, name, towers[name])
    folder_keys = _check_folder_keys(path, data)
    locked = data.get("locked", {})  # absent in checkpoints from before locked towers
    if not isinstance(locked, dict) or not all(
        name in TOWERS and isinstance(n, int) and not isinstance(n, bool) and n >= 0 for name, n in locked.items()
    ):
        raise CheckpointError(
            f"{path}: 'locked' must map towers {list(TOWERS)} to unlocked layer counts, got {locked!r}"
        )
    # what the towers were built with: their model type's keys plus their pretrained folders' own
    towers = {name: {**towers[name], **folder_keys[name]} for name in TOWERS}
    return {"synergy": data["synergy"], "towers": towers, "locked": locked}


def _check_shapes(path: Path, expected: dict, found: dict, what: str) -> None:
    """Names and shapes of ``expected`` (from the config) against ``found`` (the safetensors header): a
    ``CheckpointError`` listing the differences, before anything of that size is allocated."""
    wrong = [
        f"{k}: file {list(found[k])}, config {list(v)}"
        for k, v in expected.items()
        if k in found and list(found[k]) != list(v)
    ]
    missing = [k for k in expected if k not in found]
    if wrong or missing:
        raise CheckpointError(
            f"{path} does not match config.json ({what}): "
            + "; ".join([*(f"shape {w}" for w in wrong[:4]), *(f"missing {k}" for k in missing[:4])])
            + "; the weights and the config come from different models"
        )


def load_checkpoint(folder: str | Path, attn_implementation: str | None = None) -> tuple[SynergyModel, Tokenizer]:
    """Rebuild the model from ``config.json`` (no pretrained folders needed) and load its weights."""
    folder = Path(folder)
    data = read_checkpoint_config(folder)
    if attn_implementation is not None:
        data["synergy"]["attn_implementation"] = attn_implementation
    try:
        config = config_from_dict(data["synergy"], f"{folder}/config.json")
    except (ConfigError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder}/config.json does not describe a Synergy model: {error}") from error
    weights = folder / "model.safetensors"
    try:
        with safe_open(str(weights), "pt") as header:  # reads the header only
            shapes = {k: header.get_slice(k).get_shape() for k in header.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights} is corrupt or truncated ({error}); re-save it") from error
    # the towers built on the meta device (no memory): a vocab_size of 10**7 is refused here, not after 5 GB
    builders = {"image": build_image_tower, "text": build_text_tower, "audio": build_audio_tower}
    checked: set[str] = set()
    for name, build in builders.items():
        try:
            with torch.device("meta"):
                tower, _ = build(getattr(config, name), config.attn_implementation, data["towers"][name])
        except Exception as error:  # transformers raises many types for bad values
            raise CheckpointError(f"{folder}/config.json: towers.{name} cannot build a model ({error!r})") from error
        expected = {f"{name}_tower.{k}": tuple(v.shape) for k, v in tower.state_dict().items()}
        _check_shapes(weights, expected, shapes, f"the {name} tower")
        checked |= expected.keys()
    try:
        model = SynergyModel(config, hf_configs=data["towers"])
    except Exception as error:
        raise CheckpointError(f"{folder}/config.json does not build a model ({error!r})") from error
    # the rest of the model (projections, logit scales), each tensor checked once: the towers' were above. The whole
    # model cannot be built on the meta device (the front end computes its mel bank with .item()), so this one waits
    # for the real build; the front end's matrices are rebuilt from the config, never read from the file.
    expected = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k not in checked and not k.startswith("audio_frontend.")
    }
    _check_shapes(weights, expected, shapes, "the whole model")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights} is corrupt or truncated ({error}); re-save it") from error
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
    model.locked = dict(data["locked"])
    return model.eval(), tokenizer  # eval: dropout off, so the same input gives the same embedding


def load_train_state(folder: str | Path) -> dict | None:
    path = Path(folder) / TRAIN_STATE / "state.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds Python objects other than tensors and numbers. Synergy loads training state with "
            "weights_only=True only and will not unpickle anything else: unpickling runs whatever code the file "
            "names, so a checkpoint from anyone else could take over this machine. Delete train_state/ to resume "
            "from the weights alone, or re-save the state with `synergy train`"
        ) from None
    except (RuntimeError, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: cannot be read ({error}); delete train_state/ or re-save it") from error
