"""Text in: the bundle's ``tokenizers`` tokenizer, truncated to the model's max length, padded to the batch's longest.

The trainer configured the tokenizer (post-processor with special tokens, padding side, pad token); the runtime
only sets the truncation length and pads to the longest sequence of each batch (or to the graph's fixed length).

A text far longer than the model's context is cut before it is tokenized (``cut_long_text``): the tokenizer
builds its whole encoding before it truncates, about 250 bytes of memory per input byte, so one 12 MB string cost
3 GB. The cut keeps ``MAX_CHARS_PER_TOKEN`` characters per token of context and ends at a space, so the tokens
that survive truncation are those of the whole text whenever the kept words average under that many characters a
token (every natural-language text; only a run of thousands of spaces or one enormous "word" differs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import UnsupportedText
from .manifest import BundleError

MAX_CHARS_PER_TOKEN = 64  # far above any tokenizer's characters per token (English BPE: about 4)


def load_tokenizer(
    path: Path, max_length: int, fixed_length: int | None = None, data: bytes | None = None
) -> Tokenizer:
    """Read ``tokenizer.json`` and set truncation to ``max_length`` and padding to the batch's longest sequence
    (``fixed_length`` when the graph's length dimension is static). ``data``: the file's bytes, already read and
    verified by the caller (then ``path`` only names it in messages)."""
    try:
        if data is None:
            tokenizer = Tokenizer.from_file(str(path))
        else:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:  # tokenizers raises a bare Exception for malformed JSON
        problem = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise BundleError(f"{path}: not a readable tokenizers file ({problem}); re-export the bundle") from error
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token", "<pad>")
    pad_id = padding.get("pad_id") if tokenizer.padding else tokenizer.token_to_id("<pad>")
    if pad_id is None:
        raise BundleError(f"{path}: the tokenizer has no padding settings and no '<pad>' token; re-export the bundle")
    tokenizer.enable_padding(
        direction=padding.get("direction", "right"),
        pad_id=pad_id,
        pad_type_id=padding.get("pad_type_id", 0),
        pad_token=pad_token,
        length=fixed_length,
    )
    truncation = tokenizer.truncation or {}
    tokenizer.enable_truncation(
        max_length,
        stride=truncation.get("stride", 0),
        strategy=truncation.get("strategy", "longest_first"),
        direction=truncation.get("direction", "right"),
    )
    return tokenizer


def check_text(text, name: str) -> str:
    """A string the tokenizer can take: Unicode text without lone surrogates (``"\\ud800"`` cannot be encoded as
    UTF-8, and the tokenizer would fail the whole batch on it)."""
    if not isinstance(text, str):
        raise UnsupportedText(name, f"expected a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UnsupportedText(
            name,
            f"contains a lone surrogate {text[error.start]!r} at character {error.start}, which is not Unicode "
            "text; decode the source with errors='replace' or fix the string",
        ) from error
    return text


def cut_long_text(text: str, max_tokens: int) -> str:
    """``text`` cut to at most ``max_tokens * MAX_CHARS_PER_TOKEN`` characters, at the last whitespace in the
    second half of that span (so no word is split), or at the limit where there is none. Shorter text is returned
    as is."""
    limit = max_tokens * MAX_CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    for end in range(limit, limit // 2, -1):
        if text[end].isspace():
            return text[:end]
    return text[:limit]


def tokenize(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (input_ids [B, L], attention_mask [B, L]) int64, L = the longest (truncated) sequence. Texts far
    past the tokenizer's truncation length are cut first (``cut_long_text``), so memory stays bounded."""
    max_tokens = (tokenizer.truncation or {}).get("max_length")
    if max_tokens:
        texts = [cut_long_text(text, max_tokens) for text in texts]
    encodings = tokenizer.encode_batch(texts)
    ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask
