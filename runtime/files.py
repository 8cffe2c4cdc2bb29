"""Opening files the runtime reads (inputs, labels files, manifests, graphs, tokenizers): regular files only.

A path may name a FIFO, a device (``/dev/zero``), a socket or a symlink loop. Opening a FIFO for reading blocks until
a writer appears (forever, for ``mkfifo x.wav``), and a device never ends; both would hang a worker. So every path
is opened with ``O_NONBLOCK`` (which never blocks on a FIFO and changes nothing for a regular file), checked with
``fstat`` on the opened descriptor (no window between the check and the read), and refused unless it is a regular
file. "No such file" is said only of a path that does not exist.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import BinaryIO

KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


class NotARegularFile(OSError):
    """The path exists (or is a broken or looping link) but is not a regular file that can be read. ``problem``
    says what it is, in words."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def describe_kind(mode: int) -> str:
    return next((words for test, words in KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (symlinks followed). Raises ``NotARegularFile``
    with the reason in words: no such file, a folder, a FIFO, a device, a symlink loop, no permission."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as error:
        problem = "no such file" if not os.path.lexists(path) else "is a broken symbolic link (its target is missing)"
        raise NotARegularFile(path, problem) from error
    except IsADirectoryError as error:
        raise NotARegularFile(path, "is a folder") from error
    except PermissionError as error:
        raise NotARegularFile(path, "is not readable (permission denied)") from error
    except OSError as error:
        problem = "is a symbolic link loop" if error.errno == errno.ELOOP else os.strerror(error.errno or 0).lower()
        raise NotARegularFile(path, problem) from error
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise NotARegularFile(path, "is a folder")
        if not stat.S_ISREG(mode):
            raise NotARegularFile(path, f"is {describe_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_input(path: str | os.PathLike, name: str, kind: str, error: Callable[[str, str], Exception]) -> BinaryIO:
    """``open_regular`` for an input file of ``kind`` ("audio", "image", "video"); a path that is not a regular file
    raises ``error(name, problem)`` (``UnsupportedAudio``, ...) whose problem says what it is and what to do:
    ``no such file; check the path``, ``is a folder; pass audio files (the CLI expands folders and globs)``."""
    try:
        return open_regular(path)
    except NotARegularFile as problem:
        if problem.problem == "is a folder":
            hint = f"pass {kind} files (the CLI expands folders and globs)"
        else:
            hint = "check the path" if "no such" in problem.problem else f"pass a regular {kind} file"
        raise error(name, f"{problem.problem}; {hint}") from problem


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (``NotARegularFile`` otherwise)."""
    with open_regular(path) as file:
        size = os.fstat(file.fileno()).st_size
        if size > limit:
            raise NotARegularFile(path, f"is {size:,} bytes, over the {limit:,}-byte limit for this file")
        data = file.read(size)
        while len(data) <= limit and (more := file.read(1 << 20)):  # a file that grows while it is read
            data += more
    if len(data) > limit:
        raise NotARegularFile(path, f"is over the {limit:,}-byte limit for this file")
    return data
