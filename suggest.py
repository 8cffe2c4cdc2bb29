"""Close-match suggestions for mistyped names ("did you mean"), shared by the command line and config readers.

    did_you_mean("stpes", ["steps", "seed", "lr"])   # -> " (did you mean 'steps'?)"

Pure functions over strings, no imports beyond the standard library: usable before torch loads.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(word: str, choices: Iterable[str], limit: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``limit`` of ``choices`` that look like ``word``, closest first (case-insensitive comparison)."""
    originals: dict[str, str] = {}
    for choice in choices:
        originals.setdefault(choice.casefold(), choice)
    found = difflib.get_close_matches(word.casefold(), list(originals), n=limit, cutoff=cutoff)
    return [originals[match] for match in found]


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` or `` (did you mean 'x' or 'y'?)`` to append to an error message; "" when nothing
    is close."""
    matches = close_matches(word, choices, cutoff=cutoff)
    if not matches:
        return ""
    quoted = [repr(m) for m in matches]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f" (did you mean {listed}?)"
