"""Labels for ``/v1/classify``: checked at the door, embedded through the text micro-batcher, kept in a bounded cache.

A request's own labels are limited in number (``max_labels``: 413 beyond it) and may not hold control characters
(the runtime's cleaning would drop them silently, so "cat\\x00" would quietly become "cat"). A labels file the server
was started with (``--labels``) is the operator's and is not limited.

A label's embedding is the runtime's (``Runtime.label_embeddings``): the normalised mean of its prompts' normalised
text embeddings. The prompts go through the text tower's micro-batcher like any other text item, so they share its
batches and queue and count against the request's own timeout (a client that gives up withdraws them). Embeddings
are kept in a least-recently-used cache of ``capacity`` labels, so memory stays bounded however many distinct labels
clients send.
"""

from __future__ import annotations

import unicodedata
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from synergy.runtime.prompts import label_prompts
from synergy.runtime.search import l2_normalise


class LabelCache:
    """label -> embedding [D], least recently used dropped beyond ``capacity``. Used from the event loop only."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._vectors)

    def get(self, labels: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached ones among ``labels`` (each marked as just used)."""
        found = {}
        for label in labels:
            vector = self._vectors.get(label)
            if vector is not None:
                self._vectors.move_to_end(label)
                found[label] = vector
        return found

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        for label, vector in vectors.items():
            self._vectors[label] = vector
            self._vectors.move_to_end(label)
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)


def control_character(labels: Sequence) -> tuple[int, str] | None:
    """(index, "U+XXXX") of the first label holding a control character other than whitespace, else None."""
    for index, label in enumerate(labels):
        if not isinstance(label, str):
            continue  # read_labels names the wrong type
        for char in label:
            if unicodedata.category(char) == "Cc" and not char.isspace():
                return index, f"U+{ord(char):04X}"
    return None


def prompts_of(labels: Sequence[str], templates: Sequence[str]) -> tuple[list[str], list[int]]:
    """-> (every label's prompts, flat), offsets [len(labels) + 1] into them."""
    groups = [label_prompts(label, templates) for label in labels]
    return [p for group in groups for p in group], np.cumsum([0] + [len(g) for g in groups]).tolist()


def mean_embeddings(vectors: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
    """Prompt embeddings [P, D] -> per label, the normalised mean of its prompts' [K, D] (as the runtime does)."""
    means = np.stack([vectors[offsets[i] : offsets[i + 1]].mean(axis=0) for i in range(len(offsets) - 1)])
    return l2_normalise(means).astype(np.float32)
