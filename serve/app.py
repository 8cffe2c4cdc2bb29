"""``synergy serve``: the runtime over HTTP, micro-batched across clients.

Starlette (routing, requests, multipart) on uvicorn (the ASGI server: HTTP/1.1 keep-alive, SIGTERM drain). Every
embedding item, whichever request it came in, goes into one ``MicroBatcher`` per modality of its model (``max_batch``,
``max_wait_ms``, a bounded queue), so 64 clients sending one clip each make a few batches, not 64 model calls. One
process may serve several bundles, each a ``Service`` with its own runtime and batchers, picked by the request's
``model`` field (routing.py); API keys and CORS wrap the app (auth.py).

    POST /v1/embeddings  {"modality": "audio", "input": [b64, ...]}   -> {"data": [{"index", "embedding"}], ...}
                         {"model": NAME, "input": "text" | [...]}   (OpenAI's shape, see openai_api.py; text default)
    POST /v1/classify    {"labels": [...] | "NAME", "audio": [b64...], "image": [b64...], "top_k": 5, "model": M}
    (both also take multipart/form-data: files in ``input`` / ``audio`` / ``image``, labels as a file or fields)
    GET  /v1/models  /v1/models/NAME  /healthz  /readyz  /metrics

Back-pressure: an item is queued only if the modality's queue has room (never a wait inside the event loop); a request
that does not fit is answered 503 with ``Retry-After`` and its queued items are cancelled. Errors are JSON,
``{"error": {"type": ..., "message": ...}}``: 400 malformed JSON / base64 / fields, 401 no or a wrong API key
(auth.py), 404 unknown path or model, 405, 413 body, item count, label count or work (audio seconds, image pixels)
over the limit, 415 content type, 503 queue full, 504 the request's timeout; a client that hangs up is logged as 499
in one line. A bad item (an undecodable file) is not a request error: it gets ``{"index": i, "error": ...}`` and the
other items are answered.

Bounded work: every request is bounded before work is spent on it (body bytes, JSON values, items, labels, audio
seconds and pixels from the files' headers: ``budget.py``), and its work, label prompts included (``labels.py``),
runs in the batchers under its own timeout. When the request times out or its client hangs up, its items are
withdrawn: queued ones leave the queue, and a batch in progress skips them at its next sub-batch (``cancel_every``
items for audio and images), so nobody's tower keeps working for a caller that has gone.

The rooms: this file holds the limits and the route table; ``requests.py`` reads a request (body, fields, items),
``endpoints.py`` answers it (one handler per path, and the wrapper that times, counts and maps errors), and
``service.py`` runs one model (its runtime, batchers, label cache and work checks).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from synergy.runtime import InferUsageError

from .endpoints import Endpoints
from .problems import Problem, problem_response
from .routing import Models
from .service import Service

__all__ = ["ServeLimits", "Service", "create_app"]  # Service: its home is service.py; server.py imported it from here


@dataclass(frozen=True)
class ServeLimits:
    """The server's bounds: its batches and queues, and what one request may ask (``synergy serve --max-*``)."""

    max_batch: int = 32  # items per model call
    max_wait_ms: float = 5.0  # how long a batch waits to fill after its first item
    max_queue: int = 256  # items waiting per modality; beyond it: 503
    max_items: int = 64  # items per request
    max_body_bytes: int = 32 * 1024 * 1024
    request_timeout_s: float = 30.0
    retry_after_s: int = 1
    max_labels: int = 1024  # labels per request (a --labels file the server was started with is not limited)
    label_cache: int = 16_384  # label embeddings kept, least recently used dropped
    max_audio_seconds: float = 1800.0  # summed over a request's audio items, from their headers
    max_megapixels: float = 256.0  # summed over a request's images, from their headers
    read_timeout_s: float = 60.0  # a request's head and body must arrive within this (connections.py)
    cancel_every: int = 8  # audio / image items per model call: withdrawn items are skipped between calls
    cancel_seconds: float = 0.05  # a call grows past cancel_every (to max_batch) while it stays this short

    def __post_init__(self):
        if self.max_items > self.max_queue:  # such a request could never be queued: 503 forever
            raise InferUsageError(
                f"--max-items {self.max_items} is over --max-queue {self.max_queue}: a request that large could "
                "never be queued; raise --max-queue or lower --max-items"
            )


def create_app(models: Models, limits: ServeLimits) -> Starlette:
    """The route table over the served ``models``; their towers load when the app starts and drain when it stops."""
    handlers = Endpoints(models, limits)

    @asynccontextmanager
    async def lifespan(app):
        models.start()
        yield
        await run_in_threadpool(models.stop)

    routes = [
        Route("/v1/embeddings", handlers.wrap("embeddings", handlers.embeddings), methods=["POST"]),
        Route("/v1/classify", handlers.wrap("classify", handlers.classify), methods=["POST"]),
        Route("/v1/models", handlers.wrap("models", handlers.list_models), methods=["GET"]),
        Route("/v1/models/{name:path}", handlers.wrap("models", handlers.model), methods=["GET"]),
        Route("/healthz", handlers.wrap("healthz", handlers.healthz), methods=["GET"]),
        Route("/readyz", handlers.wrap("readyz", handlers.readyz), methods=["GET"]),
        Route("/metrics", handlers.render_metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


async def http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own 404 and 405 (an unknown path, a wrong method) in the JSON every other error has."""
    kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(error.status_code, "HTTPError")
    return problem_response(Problem(error.status_code, kind, f"{request.method} {request.url.path}: {error.detail}"))
