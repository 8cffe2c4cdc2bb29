"""The OpenAI embeddings API's shapes, so that the stock ``openai`` client works unchanged against ``synergy serve``.

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.embeddings.create(model="demo", input=["a red circle"]).data[0].embedding     # text: as OpenAI's
    client.embeddings.create(model="demo", input=[b64], extra_body={"modality": "audio"})  # audio / image: our field
    client.models.list()

Request: ``input`` a string or a list of strings (token-id lists are refused: the server tokenizes); ``model`` a served
model's name (routing.py: another one is a 404 naming the served ones; optional while one is served);
``encoding_format`` "float" (default) or "base64" (the float32 vector's little-endian bytes, which the client asks for
by default and decodes); ``dimensions`` only the model's own size, since these models were not trained to be cut shorter
(Matryoshka), and vLLM refuses the same way.
Response: ``object: "list"``, items with ``object: "embedding"``, ``model``, ``usage`` (text: tokens after the
model's truncation; audio and images: 0), plus our ``dim``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

ENCODINGS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingOptions:
    encoding_format: str = "float"


def embedding_options(fields: dict, model: str, dim: int, problem) -> EmbeddingOptions:
    """The request's OpenAI fields but ``model`` (routing.py picked the model), checked. ``problem(status, kind,
    message)`` builds the error to raise."""
    encoding = fields.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise problem(400, "BadRequest", f"encoding_format must be one of {list(ENCODINGS)}, got {encoding!r}")
    dimensions = fields.get("dimensions")
    if dimensions is not None and dimensions != dim:
        raise problem(
            400,
            "BadRequest",
            f"dimensions={dimensions!r}: {model!r} gives {dim}-d embeddings only (it was not trained to be cut "
            "shorter); leave dimensions out",
        )
    items = fields.get("input")
    if isinstance(items, list) and items and all(isinstance(x, (int, list)) for x in items):
        raise problem(400, "BadRequest", "input as token ids is not accepted; send the text (the server tokenizes)")
    return EmbeddingOptions(encoding)


def encode_vector(vector: np.ndarray, encoding: str):
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
    return vector.tolist()


def embeddings_body(data: list[dict], model: str, dim: int, tokens: int) -> dict:
    """``data``: per item ``{"index", "embedding"}`` or ``{"index", "error"}`` (our per-item errors)."""
    for row in data:
        row["object"] = "embedding"
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model, "dim": dim, "usage": usage}


def models_body(models: list[tuple[str, int]]) -> dict:
    """``models``: (name, created) of each served model."""
    return {"object": "list", "data": [model_card(name, created) for name, created in models]}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "synergy"}
