"""`synergy infer`'s inputs: files, folders and globs per modality -> the jobs to classify, and with ``--fuse`` audio
and image files paired by stem. The inputs that fail here (a folder without files, a glob that matches nothing, a file
without a partner) become failed predictions, reported like any other."""

from __future__ import annotations

import glob
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from synergy.runtime import (
    InferUsageError,
    InputError,
    Prediction,
    UnsupportedAudio,
    UnsupportedImage,
    UnsupportedVideo,
)
from synergy.runtime.audio import AUDIO_EXTENSIONS
from synergy.runtime.image import IMAGE_EXTENSIONS
from synergy.runtime.video import VIDEO_EXTENSIONS

EXTENSIONS = {"audio": AUDIO_EXTENSIONS, "image": IMAGE_EXTENSIONS, "video": VIDEO_EXTENSIONS}
ERROR_TYPES = {"audio": UnsupportedAudio, "image": UnsupportedImage, "video": UnsupportedVideo}


class UnpairedInput(InputError):
    """With ``--fuse``: a file without a file of the other modality that has the same stem."""


@dataclass(frozen=True)
class Job:
    """One modality's items (or the fused audio+image pairs): ``files`` maps each modality to its files, in order."""

    modality: str  # "audio", "image", "video" or "audio+image"
    files: dict[str, list[str]]


@dataclass(frozen=True)
class Plan:
    """The jobs to run and the inputs that failed before any model ran, each with its modality."""

    jobs: list[Job]
    failures: list[tuple[Prediction, str]]  # each with its modality


def plan_jobs(inputs, fuse: bool) -> Plan:
    """Expand the inputs; with ``fuse``, pair audio and image files by stem (the unpaired ones fail)."""
    audio, audio_failures = expand_inputs(inputs.audio, "audio")
    image, image_failures = expand_inputs(inputs.image, "image")
    video, video_failures = expand_inputs(inputs.video, "video")
    failures = [(p, "audio") for p in audio_failures] + [(p, "image") for p in image_failures]
    if fuse:
        pairs, unpaired = pair_by_stem(audio, image)
        if not pairs:
            raise InferUsageError(
                f"--fuse found no audio and image files with the same stem among {len(audio)} audio and "
                f"{len(image)} image files; name each pair alike (dog.wav + dog.png) or drop --fuse"
            )
        audio_files = set(audio)
        failures += [(p, "audio" if p.source in audio_files else "image") for p in unpaired]
        print(
            f"--fuse: {len(pairs)} audio+image pair(s) by file stem"
            + (f"; {len(unpaired)} file(s) without a partner (reported as failed)" if unpaired else ""),
            file=sys.stderr,
            flush=True,
        )
        jobs = [Job("audio+image", {"audio": [a for a, _ in pairs], "image": [i for _, i in pairs]})]
    else:
        jobs = [Job(m, {m: files}) for m, files in (("audio", audio), ("image", image)) if files]
    jobs += [Job("video", {"video": video})] if video else []  # a video fuses its own frames and sound
    return Plan(jobs, failures + [(p, "video") for p in video_failures])


def expand_inputs(items: Sequence[str], modality: str) -> tuple[list[str], list[Prediction]]:
    """Files, folders and globs -> (files in order, failures (``Prediction``) for folders/globs that match nothing)."""
    extensions, error_type = EXTENSIONS[modality], ERROR_TYPES[modality]
    files: list[str] = []
    failures: list[Prediction] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(f) for f in path.iterdir() if f.is_file() and f.suffix.lower() in extensions)
            if not found:
                problem = f"folder has no {modality} files ({', '.join(extensions)})"
                failures.append(Prediction(item, error=error_type(item, problem)))
            files.extend(found)
        elif glob.has_magic(item) and not path.exists():
            found = sorted(f for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                failures.append(Prediction(item, error=error_type(item, "no files match this pattern")))
            files.extend(found)
        else:
            files.append(item)  # a missing file fails later, with its own message
    return files, failures


def pair_by_stem(audio: Sequence[str], image: Sequence[str]) -> tuple[list[tuple[str, str]], list[Prediction]]:
    """``--fuse``: audio and image files with the same stem -> (pairs in audio order, one failure per unpaired file).
    Raises ``InferUsageError`` when a stem names two files of one modality (which one to pair would be a guess)."""
    by_stem: dict[str, dict[str, str]] = {"audio": {}, "image": {}}
    for modality, files in (("audio", audio), ("image", image)):
        for file in files:
            stem = Path(file).stem
            other = by_stem[modality].setdefault(stem, file)
            if other != file:
                raise InferUsageError(
                    f"--fuse pairs files by stem, but {other} and {file} are both {modality} named {stem!r}; "
                    "rename one or give only one of them"
                )
    pairs = [(file, by_stem["image"][stem]) for stem, file in by_stem["audio"].items() if stem in by_stem["image"]]
    unpaired = []
    for modality, other in (("audio", "image"), ("image", "audio")):
        for stem, file in by_stem[modality].items():
            if stem not in by_stem[other]:
                problem = f"no {other} file named {stem}.* to fuse with (--fuse pairs files with the same stem)"
                unpaired.append(Prediction(file, error=UnpairedInput(file, problem)))
    return pairs, unpaired
