"""Labels for zero-shot classification: read from a file or a list, cleaned and checked (prompts: ``prompts.py``).

A labels file is UTF-8 text, one label per line. Each label is NFC-normalised, its control and invisible format
characters (zero-width spaces, BOMs, bidi marks) removed, and its whitespace (any Unicode space, tabs) collapsed to
single spaces and stripped. Blank lines are skipped. Labels that are equal after this, ignoring case, are an error
(they would split the probability between them), as is a file with no label at all.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from .errors import LabelsError
from .files import NotARegularFile, read_regular

MAX_LABELS_FILE_BYTES = 64 << 20


def normalise_label(text: str) -> str:
    """NFC, drop control/format characters, collapse and strip whitespace."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch)[0] != "C")
    return " ".join(text.split())


def read_labels(source: str | os.PathLike | Sequence[str]) -> tuple[str, ...]:
    """A labels file (path) or a sequence of strings -> the cleaned labels, in order.
    Raises ``LabelsError`` naming the file (or list) and the offending lines."""
    if isinstance(source, (str, os.PathLike)):
        path, where = Path(source), "line"
        name = str(path)
        try:
            lines = read_regular(path, MAX_LABELS_FILE_BYTES).decode("utf-8-sig").splitlines()
        except NotARegularFile as error:
            problem = "no such labels file" if error.problem == "no such file" else error.problem
            raise LabelsError(f"{name}: {problem}; pass a UTF-8 text file with one label per line") from error
        except UnicodeDecodeError as error:
            problem = f"not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
            raise LabelsError(f"{name}: {problem}") from error
    else:
        name, where = "labels", "item"
        lines = list(source)
        for i, line in enumerate(lines, 1):
            if not isinstance(line, str):
                raise LabelsError(f"labels: item {i} is a {type(line).__name__}, not a string")
    labels: list[str] = []
    seen: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(lines, 1):
        label = normalise_label(line)
        if not label:
            continue
        key = label.casefold()
        if key in seen:
            first, first_label = seen[key]
            raise LabelsError(
                f"{name}: {where}s {first} and {number} give the same label ({first_label!r} and {label!r}, "
                "ignoring case and spacing); remove one"
            )
        seen[key] = (number, label)
        labels.append(label)
    if not labels:
        raise LabelsError(f"{name}: no labels (empty or only blank lines); write one label per line")
    return tuple(labels)
