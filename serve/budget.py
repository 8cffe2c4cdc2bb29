"""A request's work, read from its files' headers before anything is decoded: seconds of audio, pixels of images.

A 1 KB request must not buy minutes of a tower: the item count alone does not bound the work, since one small FLAC
can hold ten minutes and one small PNG a 10,000 x 10,000 plain image. So the server sums what the headers promise
(``soundfile.info``: frames and rate; Pillow's ``Image.open`` reads the size without decoding) and refuses the
request (413) when the sum is over the budget. A file whose header cannot be read counts 0 here: the decoder then
refuses it as an item, cheaply, with its own message (so does audio below the runtime's minimum sample rate, which
would otherwise count as minutes).
"""

from __future__ import annotations

import io
import warnings

import soundfile
from PIL import Image

from synergy.runtime.audio import MIN_INPUT_SAMPLE_RATE
from synergy.runtime.manifest import MAX_SAMPLE_RATE


def audio_seconds(data: bytes) -> float:
    """The duration an audio file's header promises (0 when it cannot be read or its rate will be refused)."""
    try:
        info = soundfile.info(io.BytesIO(data))
    except (RuntimeError, TypeError, OSError, ValueError):  # LibsndfileError is a RuntimeError
        return 0.0
    if not MIN_INPUT_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        return 0.0
    return max(info.frames, 0) / info.samplerate


def image_pixels(data: bytes) -> int:
    """width x height from an image file's header (0 when it cannot be read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the decoder refuses bombs itself
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Exception:  # Pillow raises many types for a file that is not an image; the decoder reports it
        return 0
    return width * height


def request_work(given: dict[str, list]) -> tuple[float, int]:
    """{modality: items} -> (audio seconds, image pixels) summed over the request. Items that are not bytes (text)
    cost nothing here."""
    seconds = sum(audio_seconds(item) for item in given.get("audio", ()) if isinstance(item, bytes))
    pixels = sum(image_pixels(item) for item in given.get("image", ()) if isinstance(item, bytes))
    return seconds, pixels
