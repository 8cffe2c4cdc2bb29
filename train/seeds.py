"""Seeds derived from integers with a hash that never changes: an exact resume must draw the same augmentation and
dropout in another process, another Python version and on another rank count. Python's ``hash`` of a tuple changed
algorithm in 3.8 and is only promised within one process, so it cannot be the source."""

from __future__ import annotations

import hashlib
import struct


def stable_seed(*ints: int) -> int:
    """A 31-bit seed (fits numpy, torch and ``random``) from signed 64-bit integers: blake2b of their little-endian
    bytes. ``stable_seed(seed, step, slot)`` -> the same value everywhere, for ever (a test pins values)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(ints)}q", *ints), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF
