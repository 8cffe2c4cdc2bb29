"""What `synergy infer` shows: a table for people, or one JSON line per input (on stdout or into a file), with the
failures on stderr. Torch-free: standard library and the runtime's ``Prediction`` only.

    {"input": "a.wav", "modality": "audio", "ok": true, "top": [{"label": "dog", "probability": 0.91,
     "similarity": 0.31}, ...]}
    {"input": "b.wav", "modality": "audio", "ok": false, "error": {"type": "UnsupportedAudio", "message": "..."}}
    {"input": "c.wav + c.png", "modality": "audio+image", "audio": "c.wav", "image": "c.png", "ok": true, ...}
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from synergy.runtime import Prediction

SOURCE_WIDTH = 60
LABEL_WIDTH = 40


def shorten_path(path: str, width: int) -> str:
    """Fit ``path`` into ``width`` characters by dropping leading folders ("…/audio/dog.wav"); the file name itself
    is never cut (a name longer than ``width`` is shown whole and overflows its column)."""
    if len(path) <= width:
        return path
    parts = path.replace(os.sep, "/").split("/")
    for start in range(1, len(parts)):
        candidate = "…/" + "/".join(parts[start:])
        if len(candidate) <= width:
            return candidate
    return parts[-1]


def display_name(sources: Sequence[str], width: int) -> str:
    """One input (a file, or a fused pair "a.wav + a.png") for the table's input column."""
    if len(sources) == 1:
        return shorten_path(sources[0], width)
    share = max(1, (width - 3 * (len(sources) - 1)) // len(sources))
    return " + ".join(shorten_path(s, share) for s in sources)


@dataclass(frozen=True)
class TableLayout:
    """Column widths of the table, fitted once to every input and label of the run."""

    width: int  # the input column
    label_width: int

    @classmethod
    def fit(cls, sources: Sequence[Sequence[str]], labels: Sequence[str]) -> TableLayout:
        width = min(SOURCE_WIDTH, max([len("input"), *(len(" + ".join(s)) for s in sources)]))
        # a very long label overflows its own row rather than padding every row of the table
        return cls(width, min(LABEL_WIDTH, max([len("label"), *map(len, labels)])))


def format_table(
    predictions: Sequence[Prediction], names: Sequence[str], width: int, label_width: int, header: bool
) -> list[str]:
    """Rows for people: input, rank, label, probability, cosine similarity. Failures are left to stderr.
    ``names``: what to show for each prediction in the input column (see ``display_name``)."""
    lines = []
    if header:
        lines.append(f"{'input':<{width}}  {'#':>2}  {'label':<{label_width}}  {'probability':>11}  {'similarity':>10}")
    for prediction, name in zip(predictions, names):
        if not prediction.ok:
            continue
        for rank, score in enumerate(prediction.top, 1):
            source = name if rank == 1 else ""
            lines.append(
                f"{source:<{width}}  {rank:>2}  {score.label:<{label_width}}  "
                f"{score.probability:>11.1%}  {score.similarity:>10.3f}"
            )
    return lines


def to_json(prediction: Prediction, modality: str, parts: dict[str, str] | None = None) -> str:
    """One JSON line; ``parts``: for a fused item, its file per modality."""
    record: dict = {"input": prediction.source, "modality": modality, **(parts or {}), "ok": prediction.ok}
    if prediction.modalities:  # a video: the streams it was classified from
        record["streams"] = list(prediction.modalities)
    if prediction.ok:
        record["top"] = [
            {"label": s.label, "probability": round(s.probability, 6), "similarity": round(s.similarity, 6)}
            for s in prediction.top
        ]
    else:
        record["error"] = {"type": type(prediction.error).__name__, "message": str(prediction.error)}
    return json.dumps(record, ensure_ascii=False)


class Reporter:
    """Prints (or writes) one chunk of results at a time, so a long run shows progress; counts inputs and failures.

    ``sink``: the ``--out`` file (JSON lines there; only failures on the terminal); else JSON lines on stdout with
    ``as_json``, or the table."""

    def __init__(self, as_json: bool, sink: TextIO | None, layout: TableLayout):
        self.as_json, self.sink, self.layout = as_json, sink, layout
        self.header = True  # until the table's first row
        self.inputs = self.failed = 0

    def __call__(
        self,
        predictions: Sequence[Prediction],
        sources: Sequence[Sequence[str]],
        modality: str,
        modalities: Sequence[str] = (),
    ) -> None:
        """``sources``: each prediction's files; ``modalities``: for a fused job, the modality of each file."""
        self.inputs += len(predictions)
        self.failed += sum(not p.ok for p in predictions)
        fused = len(modalities) > 1
        for prediction, parts in zip(predictions, sources):
            line = to_json(prediction, modality, dict(zip(modalities, parts)) if fused else None)
            if self.sink is not None:
                self.sink.write(line + "\n")
            elif self.as_json:
                print(line)
        if self.sink is None and not self.as_json:
            self._table(predictions, sources)
        if not self.as_json or self.sink is not None:
            for prediction in predictions:
                if not prediction.ok:
                    print(f"error: {type(prediction.error).__name__}: {prediction.error}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        if self.sink is not None:
            self.sink.flush()

    def _table(self, predictions: Sequence[Prediction], sources: Sequence[Sequence[str]]) -> None:
        names = [display_name(parts, self.layout.width) for parts in sources]
        lines = format_table(predictions, names, self.layout.width, self.layout.label_width, self.header)
        for line in lines:
            print(line)
        if lines:
            self.header = False
