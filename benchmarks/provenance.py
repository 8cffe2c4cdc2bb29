"""What a benchmark result was measured on: shared by the scripts in this folder (run as `python benchmarks/X.py`,
which puts this folder on sys.path)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD's sha, with ``-dirty`` when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_result(path: Path, result: dict, allow_nan: bool = True) -> Path:
    """``result`` written as this folder's JSON (indent 2, sets and tuples as lists, a final newline) to ``path``,
    its folder made first; ``allow_nan=False`` refuses NaN and infinities (strict JSON). -> ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=list, allow_nan=allow_nan) + "\n")
    return path
