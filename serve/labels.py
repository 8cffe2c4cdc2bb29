"""Labels for ``/v1/classify``: checked at the door, then embedded through the text micro-batcher and cached.

A request's own labels are limited in number (``max_labels``: 413 beyond it) and may not hold control characters
(the runtime's cleaning would drop them silently, so "cat\\x00" would quietly become "cat"). A labels file the server
was started with (``--labels``) is the operator's and is not limited.

A label's embedding is the runtime's (``Runtime.label_embeddings``): the normalised mean of its prompts' normalised
text embeddings. The prompts go through the text tower's micro-batcher like any other text item, so they share its
batches and queue and count against the request's own timeout (a client that gives up withdraws them). Embeddings
are kept in the runtime's least-recently-used ``LabelCache`` (``--label-cache`` labels per bundle, with the library's
own prompt ensembling: ``runtime.zeroshot.prompts_of`` / ``mean_embeddings``), so memory stays bounded however many
distinct labels clients send.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence


def control_character(labels: Sequence) -> tuple[int, str] | None:
    """(index, "U+XXXX") of the first label holding a control character other than whitespace, else None."""
    for index, label in enumerate(labels):
        if not isinstance(label, str):
            continue  # read_labels names the wrong type
        for char in label:
            if unicodedata.category(char) == "Cc" and not char.isspace():
                return index, f"U+{ord(char):04X}"
    return None
