"""benchmarks/provenance.py: a result names the commit of the code that ran, not of the folder the script sits in."""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()


def test_the_commit_is_the_imported_checkouts(tmp_path):
    """Another checkout's ``synergy`` package first on PYTHONPATH (as a git worktree's parent would be): git_commit()
    names that checkout's HEAD, and -dirty once one of its tracked files changes."""
    checkout = tmp_path / "synergy"
    checkout.mkdir()
    (checkout / "__init__.py").write_text('"""another checkout"""\n')
    _git(checkout, "init", "-q")
    _git(checkout, "add", "__init__.py")
    _git(checkout, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "another")
    head = _git(checkout, "rev-parse", "HEAD")
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import provenance; print(provenance.git_commit())"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def commit() -> str:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert commit() == head
    (checkout / "__init__.py").write_text('"""changed"""\n')
    assert commit() == f"{head}-dirty"
