"""One way to replace a folder so that a kill at any instant leaves a whole folder: the old one or the new one.

    with atomic_folder(run / "checkpoint") as tmp:   # a sibling temp folder; write every file into it
        (tmp / "config.json").write_text(...)
    # here run/checkpoint is the new folder, fsynced; a failure inside the block left the old one untouched

The swap is two renames (``folder -> .folder.old``, ``tmp -> folder``). A kill between them leaves no ``folder`` but
a complete ``.folder.old``: :func:`recover_folder` (which every writer runs first) renames it back. POSIX has no
atomic exchange of two directories, so this recovery is what makes the window safe. A writer holds an ``flock`` on the
parent directory for the whole save; the kernel drops it when the process dies, so a temp folder found while holding
the lock is a dead writer's leftover and is removed. Files AND directories are fsynced, so a power cut after the swap
cannot bring back a folder whose entries were never written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# errors that mean "the disk (or the quota, or the file-size limit) is full", not "the data is wrong"
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """A save ran out of space; the folder it was replacing is left as it was."""


def _old(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def _temp_prefix(folder: Path) -> str:
    return f".{folder.name}."


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory bottom-up (a directory's entries are data too)."""
    directories = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            directories.append(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for directory in reversed(directories):
        _fsync_dir(directory)


@contextlib.contextmanager
def _writer_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the parent directory itself: no lock file to leave behind, and the kernel releases it
    when the process dies. It serialises writers of siblings too, which only ever costs a short wait."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _recover_locked(folder: Path) -> None:
    old = _old(folder)
    if old.is_dir():
        if folder.is_dir():  # the swap finished; only the removal of the old folder was cut short
            shutil.rmtree(old)
        else:  # killed between the two renames: the old folder is the last complete one
            os.rename(old, folder)
            _fsync_dir(folder.parent)
    for stale in folder.parent.glob(f"{_temp_prefix(folder)}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)  # a dead writer's half-written folder (we hold the lock)


def recover_folder(folder: str | Path) -> None:
    """Finish what a killed save left: bring back ``.folder.old`` when ``folder`` is missing, drop it when not,
    and remove stale temp folders. Safe to call at any time; it waits for a save in progress to end."""
    folder = Path(folder)
    with _writer_lock(folder):
        _recover_locked(folder)


def replace_folder(tmp: Path, folder: Path) -> None:
    """fsync ``tmp`` (a complete sibling of ``folder``), then put it in ``folder``'s place. The caller holds no lock:
    this is the swap alone, for writers that create their temp folder themselves (the bundle exporter)."""
    fsync_tree(tmp)
    old = _old(folder)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    # a kill here leaves only .folder.old: recover_folder() renames it back
    os.rename(tmp, folder)
    _fsync_dir(folder.parent)
    if old.exists():
        shutil.rmtree(old)


def _disk_full(error: BaseException) -> OSError | None:
    """The out-of-space OSError behind ``error``, if any (torch.save wraps it in a RuntimeError's context)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL:
            return error
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``folder``; when the block ends without an error it replaces ``folder``.

    Raises :class:`DiskFullError` (the temp folder removed, ``folder`` untouched) when the disk fills up. Write
    files through Python file objects, so that a full disk surfaces as an OSError with its errno."""
    folder = Path(folder)
    with _writer_lock(folder):
        _recover_locked(folder)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(folder), suffix=".tmp", dir=folder.parent))
        try:
            yield tmp
            replace_folder(tmp, folder)
        except BaseException as error:
            shutil.rmtree(tmp, ignore_errors=True)
            full = _disk_full(error)
            if full is not None:
                raise DiskFullError(
                    full.errno, f"out of space while writing {folder} ({full.strerror}); {folder} was not changed"
                ) from error
            raise
