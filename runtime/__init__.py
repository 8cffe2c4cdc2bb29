"""Torch-free inference on an exported bundle: embeddings, zero-shot classification, search, micro-batching.

Imports only the standard library, numpy, onnxruntime (on first use of a tower), tokenizers, soundfile, soxr and
Pillow; TensorRT and cuda-python only when ``backend="tensorrt"`` is asked for. Never torch or transformers.
"""

from .batcher import BatcherFull, MicroBatcher
from .errors import (
    BackendError,
    BundleError,
    InferUsageError,
    InputError,
    LabelsError,
    RuntimeClosed,
    UnsupportedAudio,
    UnsupportedImage,
    UnsupportedText,
    UnsupportedVideo,
)
from .labels import read_labels
from .manifest import FORMAT_VERSION, Manifest, load_manifest
from .runtime import EmbedResult, LabelScore, Prediction, Runtime, SearchHit, VideoEmbeddings

__all__ = [
    "FORMAT_VERSION",
    "BackendError",
    "BatcherFull",
    "BundleError",
    "EmbedResult",
    "InferUsageError",
    "InputError",
    "LabelScore",
    "LabelsError",
    "Manifest",
    "MicroBatcher",
    "Prediction",
    "Runtime",
    "RuntimeClosed",
    "SearchHit",
    "UnsupportedAudio",
    "UnsupportedImage",
    "UnsupportedText",
    "UnsupportedVideo",
    "VideoEmbeddings",
    "load_manifest",
    "read_labels",
]
