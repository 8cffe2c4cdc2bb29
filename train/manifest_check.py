"""Before step 1: a manifest whose paths are wrong stops the run with a count, instead of training "successfully" on
batches with nothing in them (loss 0.0, grad norm 0.0, exit 0, a checkpoint written)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from synergy.train.data import DataError, ManifestDataset

MAX_UNREADABLE = 0.05  # more than this fraction of rows unreadable is a wrong folder or column, not a few bad files
DECODE_FIRST = 8  # rows decoded for real before training; every row's files are checked for existence


@dataclass(frozen=True)
class ManifestCheck:
    path: str
    rows: int
    problems: tuple[str, ...]  # one message per unreadable row, with its manifest line
    missing: dict  # modality -> rows without it (an empty cell: by design, not an error)

    @property
    def readable(self) -> int:
        return self.rows - len(self.problems)


def check_manifest(path: str | Path, dataset: ManifestDataset) -> ManifestCheck:
    """Every row's files exist and the first ``DECODE_FIRST`` rows decode; raises DataError when more than
    ``MAX_UNREADABLE`` of the rows cannot be read."""
    problems = {}
    for index, row in enumerate(dataset.rows):
        if row.problem:
            problems[index] = f"{row.problem} (manifest line {row.line})"
            continue
        missing = next((p for p in (row.image, row.audio, row.video) if p is not None and not p.is_file()), None)
        if missing is not None:
            problems[index] = f"{missing}: no such file (manifest line {row.line})"
    for index in range(min(DECODE_FIRST, len(dataset))):
        if index not in problems and (bad := dataset[index]["bad"]):
            problems[index] = bad
    # a video_path row takes its image and audio from the video (a silent video: no audio, like an empty cell)
    missing = {m: sum(getattr(r, m) is None and r.video is None for r in dataset.rows) for m in ("image", "audio")}
    missing["text"] = sum(not (r.caption or r.label) for r in dataset.rows)
    check = ManifestCheck(str(path), len(dataset), tuple(problems[i] for i in sorted(problems)), missing)
    if len(check.problems) > MAX_UNREADABLE * check.rows:
        examples = "\n  ".join(check.problems[:3])
        raise DataError(
            f"{path}: {len(check.problems)} of {check.rows} rows cannot be read "
            f"({len(check.problems) / check.rows:.0%}, more than the {MAX_UNREADABLE:.0%} a run tolerates), e.g.\n"
            f"  {examples}\nPaths in a manifest are relative to the CSV's folder ({Path(path).parent}); fix the "
            "paths or remove those rows, then start again"
        )
    return check
