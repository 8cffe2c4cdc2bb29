"""Torch-free inference on an exported bundle: embeddings, zero-shot classification, search, micro-batching.

Imports only the standard library, numpy, onnxruntime (on first use of a tower), tokenizers, soundfile, soxr and
Pillow; TensorRT and cuda-python only when ``backend="tensorrt"`` is asked for. Never torch or transformers.
``Runtime`` (``runtime.py``) is the facade; the rooms behind it and the bundle format are described in
docs/runtime.md.
"""

from .batcher import BatcherFull, MicroBatcher
from .bundle import load_manifest
from .embedding import EmbedResult
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
from .manifest import FORMAT_VERSION, Manifest
from .prompts import check_template, fill_prompt
from .runtime import Runtime
from .search import SearchHit, cosine_top_k, fuse_embeddings, l2_normalise
from .video_embedding import VideoEmbeddings
from .zeroshot import LabelCache, LabelScore, Prediction, mean_embeddings, prompts_of

__all__ = [
    "FORMAT_VERSION",
    "BackendError",
    "BatcherFull",
    "BundleError",
    "EmbedResult",
    "InferUsageError",
    "InputError",
    "LabelCache",
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
    "check_template",
    "cosine_top_k",
    "fill_prompt",
    "fuse_embeddings",
    "l2_normalise",
    "load_manifest",
    "mean_embeddings",
    "prompts_of",
    "read_labels",
]
