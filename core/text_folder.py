"""What a pretrained text tower's folder says about using it: its pooling and the longest text it takes.

A ``save_pretrained`` folder of any transformers encoder (BERT, MiniLM, RoBERTa, XLM-R, ...) may also be a
sentence-transformers folder: ``modules.json`` names a ``Pooling`` module whose ``config.json`` says CLS or mean
pooling, and ``sentence_bert_config.json`` says the longest input (``max_seq_length``; all-MiniLM-L6-v2: 256).
Without them the tower pools its first token (the CLS / <s> state) and takes what its tokenizer and its position
embeddings allow. Read once, when a model is built from the folder; the checkpoint records the answer, so a
checkpoint needs no folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

POOLINGS = ("cls", "mean")
# position ids of these model types start after padding_idx (pad_token_id + 1), so max_position_embeddings
# counts pad_token_id + 1 positions that no token uses
_POSITIONS_AFTER_PADDING = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "mpnet"}
)
_NO_LIMIT = 1_000_000  # tokenizers without a limit say model_max_length = int(1e30)


@dataclass(frozen=True)
class TextFolder:
    pooling: str  # "cls" | "mean"
    max_length: int  # tokens, special tokens included


def read_text_folder(folder: str | Path) -> TextFolder:
    """The pooling and max length of the pretrained text tower in ``folder`` (its ``config.json`` must exist)."""
    folder = Path(folder)
    config = _json(folder / "config.json")
    return TextFolder(_pooling(folder), _max_length(folder, config))


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot be read as JSON ({error}); re-save the folder with save_pretrained") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _pooling_config(folder: Path) -> Path | None:
    """The sentence-transformers Pooling module's config: where modules.json puts it, else 1_Pooling/."""
    modules = folder / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text())
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and str(entry.get("type", "")).endswith(".Pooling"):
                path = (folder / str(entry.get("path", "")) / "config.json").resolve()
                if folder.resolve() in path.parents and path.is_file():
                    return path
    default = folder / "1_Pooling" / "config.json"
    return default if default.is_file() else None


def _pooling(folder: Path) -> str:
    path = _pooling_config(folder)
    if path is None:
        return "cls"
    modes = sorted(
        k.removeprefix("pooling_mode_") for k, v in _json(path).items() if k.startswith("pooling_mode_") and v
    )
    if modes == ["mean_tokens"]:
        return "mean"
    if modes == ["cls_token"]:
        return "cls"
    raise ValueError(
        f"{path}: pooling {modes or 'none'} is not supported (Synergy pools by CLS or by the mean over the attention "
        "mask); set text.pooling to cls or mean to choose one yourself"
    )


def _max_length(folder: Path, config: dict) -> int:
    """sentence-transformers' max_seq_length, else the tokenizer's model_max_length, capped by the positions."""
    positions = int(config.get("max_position_embeddings") or _NO_LIMIT)
    if config.get("model_type") in _POSITIONS_AFTER_PADDING:
        positions -= int(config.get("pad_token_id") or 0) + 1
    wanted = None
    if (folder / "sentence_bert_config.json").is_file():
        wanted = _json(folder / "sentence_bert_config.json").get("max_seq_length")
    if not wanted and (folder / "tokenizer_config.json").is_file():
        wanted = _json(folder / "tokenizer_config.json").get("model_max_length")
    if not isinstance(wanted, int) or wanted <= 0 or wanted >= _NO_LIMIT:
        wanted = positions
    length = min(wanted, positions)
    if length >= _NO_LIMIT:
        raise ValueError(
            f"{folder}: neither the tokenizer nor config.json (max_position_embeddings) bounds the text length; "
            "add model_max_length to tokenizer_config.json"
        )
    return length
