"""The runtime's typed errors. Each message names the input and says what to do.

``InputError`` and its subclasses are per-item: in a batch, the bad item carries its error and the others go on.
``InferUsageError`` is a problem with how the runtime was asked to run (no inputs, a bad labels file, an unusable
bundle): nothing can be computed, and the CLI maps it to exit code 2. ``BundleError`` lives in ``manifest.py``
(the format's ground floor) and is re-exported here.
"""

from __future__ import annotations

from .manifest import BundleError


class InputError(ValueError):
    """One input (a file, bytes, an array, a string) that cannot be embedded. ``source`` names it."""

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class UnsupportedAudio(InputError):
    """Audio that cannot be decoded or used: missing, empty, truncated, not finite, too long, too many channels."""


class UnsupportedImage(InputError):
    """An image that cannot be decoded or used."""


class UnsupportedVideo(InputError):
    """A video that cannot be decoded or used: not a video, no stream, truncated, 0 frames, too long or too large."""


class UnsupportedText(InputError):
    """A text input that is not a string."""


class InferUsageError(ValueError):
    """The request itself cannot run (no inputs, bad labels, unusable bundle or backend): exit code 2 in the CLI."""


class LabelsError(InferUsageError):
    """A labels file or list that cannot be used: missing, empty, duplicated or undecodable labels."""


class BackendError(InferUsageError):
    """The requested backend or device is not available on this machine."""


class RuntimeClosed(InferUsageError):
    """A call on a ``Runtime`` after ``close()``: closed is closed; open the bundle again."""


def non_finite(modality: str, source: str, what: str = "embedding") -> InputError:
    """A NaN or Inf embedding is never an answer: the item fails alone, with what usually causes it."""
    error_type = {"audio": UnsupportedAudio, "image": UnsupportedImage}.get(modality, UnsupportedText)
    hint = {
        "audio": "samples far outside [-1, 1] (float audio must be normalised)",
        "image": "pixel values the model cannot represent",
        "text": "a text the model cannot represent",
    }.get(modality, "an input the model cannot represent")
    return error_type(source, f"the model gives non-finite {what} for this input ({hint}); check or re-encode it")


__all__ = [
    "BackendError",
    "BundleError",
    "InferUsageError",
    "InputError",
    "LabelsError",
    "RuntimeClosed",
    "UnsupportedAudio",
    "UnsupportedImage",
    "UnsupportedText",
    "UnsupportedVideo",
]
