"""What a benchmark result was measured on: shared by the scripts in this folder (run as `python benchmarks/X.py`,
which puts this folder on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_root() -> Path:
    """The checkout whose ``synergy`` package this process imports: what a result measured. An editable install
    points at one checkout, which need not be the one the script runs from (a script in a ``git worktree`` imports
    the main checkout's code unless PYTHONPATH names the worktree's parent), so the script's own folder can name the
    wrong commit."""
    import importlib.util

    spec = importlib.util.find_spec("synergy")
    return Path(spec.origin).resolve().parent if spec is not None and spec.origin else ROOT


def git_commit(root: Path | None = None) -> str | None:
    """HEAD's sha of ``root`` (default: :func:`code_root`), with ``-dirty`` when tracked files differ from it; None
    outside a git checkout. ``$SYNERGY_SOURCE_COMMIT``, where set, wins, marked ``-copy``: a copy of the tree (the GPU
    machine's) can carry no .git or a stale one (the H200's first runs read the session's starting commit, -dirty),
    and only whoever made the copy knows what it was made from."""
    source = os.environ.get("SYNERGY_SOURCE_COMMIT")
    if source:
        return f"{source}-copy"
    root = code_root() if root is None else root
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
