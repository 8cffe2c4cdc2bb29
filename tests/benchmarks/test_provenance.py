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
    env.pop("SYNERGY_SOURCE_COMMIT", None)  # set, it would win over git (the next test)

    def commit() -> str:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert commit() == head
    (checkout / "__init__.py").write_text('"""changed"""\n')
    assert commit() == f"{head}-dirty"


def test_a_copy_names_the_commit_it_was_made_from(tmp_path):
    """The GPU machine gets a copy of the tree whose .git may be absent or stale: SYNERGY_SOURCE_COMMIT, set by whoever
    made the copy, wins over what git says there, marked ``-copy``; without it and without .git, None."""
    copy = tmp_path / "synergy"
    copy.mkdir()
    (copy / "__init__.py").write_text('"""a copy"""\n')
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import provenance; print(provenance.git_commit())"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    env.pop("SYNERGY_SOURCE_COMMIT", None)

    def commit(folder: Path = copy, **extra) -> str:
        code_here = code.replace(
            "provenance.git_commit()", f"provenance.git_commit(__import__('pathlib').Path({str(folder)!r}))"
        )
        done = subprocess.run([sys.executable, "-c", code_here], env={**env, **extra}, capture_output=True,
                              text=True, check=True)  # fmt: skip
        return done.stdout.strip()

    assert commit() == "None"
    assert commit(SYNERGY_SOURCE_COMMIT="abc123") == "abc123-copy"
    _git(copy, "init", "-q")  # a stale .git: what it says loses to the copier's word
    _git(copy, "add", "__init__.py")
    _git(copy, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "stale")
    assert commit() == _git(copy, "rev-parse", "HEAD")
    assert commit(SYNERGY_SOURCE_COMMIT="abc123") == "abc123-copy"
