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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from synergy.runtime import BatcherFull, InferUsageError, InputError, LabelsError, MicroBatcher, Runtime, read_labels
from synergy.runtime.search import fuse_embeddings

from .budget import request_work
from .labels import LabelCache, control_character, mean_embeddings, prompts_of
from .metrics import BATCH_SIZE_BUCKETS, CONTENT_TYPE, LATENCY_BUCKETS, Metrics
from .openai_api import embedding_options, embeddings_body, encode_vector, model_card, models_body
from .problems import Problem, problem_response
from .routing import Models

logger = logging.getLogger("synergy.serve")
JSON_TYPES = ("application/json", "", "text/plain", "application/x-www-form-urlencoded")  # curl -d sends the last


@dataclass(frozen=True)
class ServeLimits:
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

    def __post_init__(self):
        if self.max_items > self.max_queue:  # such a request could never be queued: 503 forever
            raise InferUsageError(
                f"--max-items {self.max_items} is over --max-queue {self.max_queue}: a request that large could "
                "never be queued; raise --max-queue or lower --max-items"
            )


@dataclass(frozen=True)
class Embedded:
    """One item's embedding and the batch that computed it (times from ``time.perf_counter``)."""

    vector: np.ndarray
    started: float
    finished: float
    batch_size: int


def item_error(index: int, error: BaseException) -> dict:
    message = error.problem if isinstance(error, InputError) else str(error)
    return {"index": index, "error": {"type": type(error).__name__, "message": f"input[{index}]: {message}"}}


class Service:
    """One served model: its runtime, one micro-batcher per tower, its label cache, and its series in the metrics
    the models share (labelled ``model="NAME"``)."""

    def __init__(
        self, runtime: Runtime, limits: ServeLimits, name: str, labels_files: dict[str, Path], metrics: Metrics
    ):
        self.runtime = runtime
        self.limits = limits
        self.name = name
        self.labels_files = labels_files
        self.modalities = tuple(runtime.manifest.towers)
        self.metrics = metrics
        self.label_cache = LabelCache(limits.label_cache)
        self.ready = threading.Event()
        self.draining = False
        self.started = int(time.time())  # /v1/models' "created"
        self.load_error: str | None = None
        self.batchers: dict[str, MicroBatcher] = {}
        self._describe_metrics()

    def _describe_metrics(self) -> None:
        m = self.metrics
        m.describe(
            "synergy_requests_total", "counter", "HTTP requests by endpoint, model (once named) and status code."
        )
        m.describe("synergy_request_errors_total", "counter", "Requests answered 4xx/5xx, by endpoint and error type.")
        m.describe(
            "synergy_item_errors_total", "counter", "Items that could not be embedded, by model, modality and type."
        )
        m.describe("synergy_items_total", "counter", "Items embedded (ok or failed), by model and modality.")
        m.describe("synergy_queue_depth", "gauge", "Items waiting for a batch, by model and modality.")
        m.describe("synergy_label_cache_entries", "gauge", "Label embeddings in the cache, by model.")
        m.describe(
            "synergy_batch_size", "histogram", "Items per model call, by model and modality.", BATCH_SIZE_BUCKETS
        )
        m.describe(
            "synergy_batch_seconds",
            "histogram",
            "Decode + model time per batch, by model and modality.",
            LATENCY_BUCKETS,
        )
        m.describe(
            "synergy_request_seconds",
            "histogram",
            "Request latency, by endpoint (and model, once the request names one).",
            LATENCY_BUCKETS,
        )
        for modality in self.modalities:
            m.set("synergy_queue_depth", 0, modality=modality, model=self.name)

    # --------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        limits = self.limits
        for modality in self.modalities:
            self.batchers[modality] = MicroBatcher(
                self._process(modality),
                max_batch=limits.max_batch,
                max_wait_ms=limits.max_wait_ms,
                max_queue=limits.max_queue,
                sub_batch=None if modality == "text" else limits.cancel_every,  # a text item is one short row
                name=f"synergy-serve-{self.name}-{modality}",
            )

        def load() -> None:  # /healthz answers at once; /readyz once every tower is loaded
            try:
                self.runtime.load()
            except Exception as error:  # reported by /readyz (and the log); requests report their own errors
                logger.exception("loading the towers of %r failed", self.name)
                self.load_error = f"{type(error).__name__}: {error}"
                return
            self.ready.set()

        threading.Thread(target=load, name=f"synergy-serve-load-{self.name}", daemon=True).start()

    def stop(self) -> None:
        """After uvicorn has finished the in-flight requests: run what is still queued, then free the towers."""
        self.draining = True
        for batcher in self.batchers.values():
            batcher.close()
        self.runtime.close()

    def _process(self, modality: str) -> Callable[[list], list]:
        def process(items: list) -> list:
            started = time.perf_counter()
            self._count_queue(modality)
            result = self.runtime.embed_batch(modality, items)
            finished = time.perf_counter()
            labels = {"modality": modality, "model": self.name}
            self.metrics.observe("synergy_batch_size", len(items), **labels)
            self.metrics.observe("synergy_batch_seconds", finished - started, **labels)
            self.metrics.inc("synergy_items_total", len(items), **labels)
            out = []
            for vector, error in zip(result.vectors, result.errors):
                if error is None:
                    out.append(Embedded(vector, started, finished, len(items)))
                else:
                    self.metrics.inc("synergy_item_errors_total", **labels, type=type(error).__name__)
                    out.append(error)
            return out

        return process

    # ------------------------------------------------------------------------------------------------ batching

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the text tower saw for ``texts`` (after the model's truncation): OpenAI's ``usage``."""
        return self.runtime.count_tokens(texts)

    def _count_queue(self, modality: str) -> None:
        """The gauge is read from the batcher: live items only (a withdrawn item leaves the queue at once)."""
        self.metrics.set("synergy_queue_depth", len(self.batchers[modality]), modality=modality, model=self.name)

    def submit_all(self, modality: str, items: list) -> list:
        """Queue every item or none: on a full queue the items already queued are cancelled and 503 is raised."""
        batcher = self.batchers[modality]
        futures = []
        for item in items:
            try:
                futures.append(batcher.submit(item, timeout=0))  # never waits: the event loop must not block
            except (BatcherFull, RuntimeError) as error:
                self.withdraw({modality: futures})
                if isinstance(error, BatcherFull):
                    raise Problem(
                        503,
                        "QueueFull",
                        f"the {modality} queue is full ({self.limits.max_queue} items); retry after "
                        f"{self.limits.retry_after_s} s",
                        {"Retry-After": str(self.limits.retry_after_s)},
                    ) from error
                raise Problem(503, "ShuttingDown", "the server is shutting down") from error
        self._count_queue(modality)
        return futures

    def withdraw(self, futures: dict[str, list]) -> None:
        """Cancel a request's items: queued ones leave the queue, and those in a batch that has not reached their
        sub-batch are skipped (``cancel()`` is False only for items already running or done)."""
        for modality, queued in futures.items():
            for future in queued:
                future.cancel()
            self._count_queue(modality)

    async def embed(self, requests: dict[str, list], timings: dict, deadline: float, gone: asyncio.Future) -> dict:
        """{modality: items} -> {modality: [Embedded | InputError per item]}, micro-batched with other requests.
        ``deadline`` (``time.perf_counter``): past it, 504; ``gone``: done when the client hangs up (499). Either way
        the items are withdrawn."""
        if self.draining:
            raise Problem(503, "ShuttingDown", "the server is shutting down")
        submitted = time.perf_counter()
        futures: dict[str, list] = {}
        try:
            for modality, items in requests.items():
                futures[modality] = self.submit_all(modality, items)
        except Problem:
            self.withdraw(futures)  # the modalities queued before the one that was full
            raise
        flat = [f for fs in futures.values() for f in fs]
        results = asyncio.ensure_future(asyncio.gather(*map(asyncio.wrap_future, flat), return_exceptions=True))
        finished = False
        try:
            remaining = max(deadline - time.perf_counter(), 0.0)
            await asyncio.wait([results, gone], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finished = results.done()
        finally:
            if not finished:  # timed out, client gone, or this handler cancelled: nobody will read the answers
                results.cancel()
                self.withdraw(futures)
        if not finished:
            if gone.done():
                raise Problem(499, "ClientClosedRequest", "the client closed the connection before the answer")
            raise Problem(504, "Timeout", f"the request took longer than {self.limits.request_timeout_s} s")
        done = results.result()
        for result in done:
            if isinstance(result, BaseException) and not isinstance(result, InputError):
                raise Problem(500, type(result).__name__, str(result))  # the whole batch failed (a backend error)
        good = [r for r in done if isinstance(r, Embedded)]
        if good:
            timings["queue"] = max(r.started for r in good) - submitted
            timings["batch"] = max(r.finished - r.started for r in good)
            timings["batch_size"] = max(r.batch_size for r in good)
        answers, start = {}, 0
        for modality, items in requests.items():
            answers[modality] = list(done[start : start + len(items)])
            start += len(items)
        return answers

    def labels(self, value) -> tuple[str, ...]:
        """A request's labels: a list of strings (at most ``max_labels``, no control characters), or the name of a
        labels file given to ``synergy serve --labels``."""
        if isinstance(value, str):
            if value not in self.labels_files:
                known = ", ".join(sorted(self.labels_files)) or "none (start the server with --labels FILE)"
                raise Problem(400, "UnknownLabels", f"no labels file named {value!r}; known: {known}")
            value = self.labels_files[value]
        elif not isinstance(value, list) or not value:
            raise Problem(400, "BadRequest", "labels must be a non-empty list of strings or a labels file name")
        else:
            check_label_count(len(value), self.limits.max_labels)
            bad = control_character(value)
            if bad is not None:
                raise Problem(
                    400, "BadLabels", f"labels[{bad[0]}] holds the control character {bad[1]}; remove it from the label"
                )
        try:
            return read_labels(value)
        except LabelsError as error:
            raise Problem(400, "BadLabels", str(error)) from error

    async def label_matrix(self, labels: Sequence[str], deadline: float, gone: asyncio.Future) -> np.ndarray:
        """labels -> [K, D]: cached ones from the cache, the others' prompts through the text batcher, a wave of
        ``max_batch`` prompts at a time (the queue is never asked for more room than a batch), under the request's
        deadline."""
        if "text" not in self.batchers:
            raise Problem(400, "BadModality", "this bundle has no text tower, which /v1/classify needs for labels")
        vectors = self.label_cache.get(labels)
        missing = [label for label in labels if label not in vectors]
        if missing:
            prompts, offsets = prompts_of(missing, self.runtime.manifest.text.prompt_templates)
            embedded = []
            wave = min(self.limits.max_batch, self.limits.max_queue)
            for start in range(0, len(prompts), wave):
                results = (await self.embed({"text": prompts[start : start + wave]}, {}, deadline, gone))["text"]
                for prompt, result in zip(prompts[start : start + wave], results):
                    if not isinstance(result, Embedded):
                        message = f"the label prompt {prompt[:60]!r} cannot be embedded: {result}"
                        raise Problem(400, "BadLabels", message)
                    embedded.append(result.vector)
            fresh = dict(zip(missing, mean_embeddings(np.stack(embedded), offsets)))
            self.label_cache.put(fresh)
            self.metrics.set("synergy_label_cache_entries", len(self.label_cache), model=self.name)
            vectors.update(fresh)
        return np.stack([vectors[label] for label in labels])

    async def check_work(self, given: dict[str, list]) -> None:
        """413 when the request's audio seconds or image pixels (from the files' headers) are over the budget."""
        seconds, pixels = await run_in_threadpool(request_work, given)
        limits = self.limits
        if seconds > limits.max_audio_seconds:
            raise Problem(
                413,
                "TooMuchWork",
                f"the request's audio lasts {seconds:.1f} s in all, over the limit of {limits.max_audio_seconds:g} s "
                "per request (--max-audio-seconds); send fewer or shorter clips",
            )
        if pixels > limits.max_megapixels * 1e6:
            raise Problem(
                413,
                "TooMuchWork",
                f"the request's images hold {pixels / 1e6:.1f} megapixels in all, over the limit of "
                f"{limits.max_megapixels:g} per request (--max-megapixels); send fewer or smaller images",
            )


def check_label_count(count: int, limit: int) -> None:
    if count > limit:
        raise Problem(413, "TooManyLabels", f"{count} labels is over the limit of {limit} per request (--max-labels)")


# ------------------------------------------------------------------------------------------------ request parsing


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "BadRequest", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise Problem(413, "BodyTooLarge", f"the body ({declared} B) is over the limit of {limit} B")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "BodyTooLarge", f"the body is over the limit of {limit} B")
        chunks.append(chunk)
    return b"".join(chunks)


def json_value_limit(limits: ServeLimits) -> int:
    """The most JSON values a body may hold (counted by its commas, an upper bound): parsing costs per value, so a
    1 MB body of two-byte labels would cost more than its size suggests. Generous: a request's items and labels,
    with room for commas inside text and other fields."""
    return 16 * (limits.max_items + limits.max_labels) + 1024


def parse_json(body: bytes, limits: ServeLimits) -> dict:
    limit = json_value_limit(limits)
    if body.count(b",") > limit:  # bytes.count runs at memory speed: checked before any value is built
        raise Problem(
            413,
            "TooManyValues",
            f"the body holds over {limit} JSON values (by its commas); a request carries at most {limits.max_items} "
            f"items (--max-items) and {limits.max_labels} labels (--max-labels)",
        )
    try:
        fields = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Problem(400, "MalformedJSON", f"the body is not valid JSON: {error}") from error
    except RecursionError as error:
        raise Problem(400, "MalformedJSON", "the body's JSON nests too deeply; requests need a few levels") from error
    if not isinstance(fields, dict):
        raise Problem(400, "MalformedJSON", "the body must be a JSON object")
    return fields


PARSE_INLINE_BYTES = 64 * 1024  # larger bodies are parsed in a worker thread, off the event loop


async def read_fields(request: Request, limits: ServeLimits) -> dict:
    """A JSON object or a multipart form -> {field: value}. Multipart: a repeated field is a list; a file is bytes."""
    body = await read_body(request, limits.max_body_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in JSON_TYPES:
        if len(body) <= PARSE_INLINE_BYTES:
            return parse_json(body, limits)
        return await run_in_threadpool(parse_json, body, limits)
    if kind == "multipart/form-data":

        async def replay():  # the body was read (and capped) above; the form parser reads it again from here
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=limits.max_items * 3 + 1, max_fields=limits.max_items * 3 + limits.max_labels + 16
            )
        except HTTPException as error:
            raise Problem(400, "MalformedMultipart", str(error.detail)) from error
        fields: dict[str, list] = {}
        for key, value in form.multi_items():
            fields.setdefault(key, []).append(await value.read() if isinstance(value, UploadFile) else value)
        return {"multipart": True, **fields}
    raise Problem(415, "UnsupportedMediaType", f"send application/json or multipart/form-data, not {kind!r}")


def decode_items(modality: str, items, field: str, multipart: bool) -> list:
    """JSON: base64 strings (audio, image) or strings (text). Multipart: file bytes, or strings for text."""
    if isinstance(items, (str, bytes)):
        items = [items]
    if not isinstance(items, list):
        raise Problem(400, "BadRequest", f"{field} must be a list")
    out = []
    for i, item in enumerate(items):
        if modality == "text":
            if not isinstance(item, str):
                raise Problem(400, "BadRequest", f"{field}[{i}] must be a string (text)")
            out.append(item)
        elif isinstance(item, bytes):
            out.append(item)
        elif not isinstance(item, str):
            raise Problem(400, "BadRequest", f"{field}[{i}] must be a base64 string of a {modality} file")
        elif multipart:
            out.append(item.encode())  # a form field, not a file: let the decoder report it
        else:
            try:
                out.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError) as error:
                raise Problem(400, "BadBase64", f"{field}[{i}] is not valid base64: {error}") from error
    return out


def parse_top_k(value) -> int:
    """JSON: an integer (not 1.5, not true); multipart: its digits."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # bool first: True is an int
        raise Problem(400, "BadRequest", f"top_k must be an integer >= 1, got {value!r}")
    return value


@asynccontextmanager
async def watch_disconnect(request: Request):
    """A future done when the client hangs up, for as long as the block runs. After the body has been read, the
    next ``receive()`` returns only when the connection closes (``http.disconnect``)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait())
    try:
        yield watcher
    finally:
        watcher.cancel()


def server_timing(timings: dict) -> str:
    parts = [f"{k};dur={v * 1000:.3f}" for k, v in timings.items() if k != "batch_size"]
    if "batch_size" in timings:
        parts.append(f"batch_size;desc={timings['batch_size']}")
    return ", ".join(parts)


# -------------------------------------------------------------------------------------------------- endpoints


def create_app(models: Models, limits: ServeLimits) -> Starlette:
    metrics = models.metrics

    def endpoint(name: str, handler):
        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            request.state.model = None  # set by ``pick`` once the request names a served model
            try:
                response = await handler(request)
            except ClientDisconnect:  # hung up mid-body (or closed for reading too slowly): not a server error
                response = client_gone(request, name, "while sending its body")
            except Problem as problem:
                if problem.status == 499:
                    response = client_gone(request, name, "while its request was worked on")
                else:
                    metrics.inc("synergy_request_errors_total", **metric_labels(request, name), type=problem.kind)
                    response = problem_response(problem)
            except Exception as error:  # a bug or a backend failure: JSON like every other error, and logged
                logger.exception("%s %s failed", request.method, request.url.path)
                metrics.inc("synergy_request_errors_total", **metric_labels(request, name), type=type(error).__name__)
                response = problem_response(Problem(500, type(error).__name__, str(error) or "internal error"))
            metrics.inc("synergy_requests_total", **metric_labels(request, name), code=str(response.status_code))
            metrics.observe("synergy_request_seconds", time.perf_counter() - started, **metric_labels(request, name))
            return response

        return wrapped

    def metric_labels(request: Request, name: str) -> dict:
        """A request's metric labels: its endpoint, and its model once known (not for /healthz or a 404 model)."""
        model = request.state.model
        return {"endpoint": name} if model is None else {"endpoint": name, "model": model}

    def pick(request: Request, asked) -> Service:
        service = models.pick(asked)
        request.state.model = service.name
        return service

    def client_gone(request: Request, name: str, when: str) -> Response:
        """nginx's 499: logged in one line and counted; the answer goes nowhere."""
        client = f"{request.client[0]}:{request.client[1]}" if request.client else "a client"
        logger.warning("499 %s %s: %s closed the connection %s", request.method, request.url.path, client, when)
        metrics.inc("synergy_request_errors_total", **metric_labels(request, name), type="ClientClosedRequest")
        return Response(status_code=499)

    def check_count(count: int) -> None:
        if count == 0:
            raise Problem(400, "BadRequest", "no items: send at least one")
        if count > limits.max_items:
            raise Problem(413, "TooManyItems", f"{count} items is over the limit of {limits.max_items} per request")

    async def embeddings(request: Request) -> Response:
        timings = {}
        started = time.perf_counter()
        fields = await read_fields(request, limits)
        multipart = fields.pop("multipart", False)
        fields = {k: v[0] if multipart and k != "input" and len(v) == 1 else v for k, v in fields.items()}
        service = pick(request, fields.get("model"))
        dim = service.runtime.manifest.embed_dim
        options = embedding_options(fields, service.name, dim, Problem)
        modality = fields.get("modality", "text")  # OpenAI's clients send text without one
        if modality not in service.modalities:
            raise Problem(400, "BadModality", f"modality must be one of {list(service.modalities)}, got {modality!r}")
        if "input" not in fields:
            raise Problem(400, "BadRequest", "missing field 'input'")
        items = decode_items(modality, fields["input"], "input", multipart)
        check_count(len(items))
        await service.check_work({modality: items})
        timings["parse"] = time.perf_counter() - started
        async with watch_disconnect(request) as gone:
            results = (await service.embed({modality: items}, timings, started + limits.request_timeout_s, gone))[
                modality
            ]
        data = [
            {"index": i, "embedding": encode_vector(r.vector, options.encoding_format)}
            if isinstance(r, Embedded)
            else item_error(i, r)
            for i, r in enumerate(results)
        ]
        tokens = await run_in_threadpool(service.count_tokens, items) if modality == "text" else 0
        body = embeddings_body(data, service.name, dim, tokens)
        return JSONResponse(body, headers={"Server-Timing": server_timing(timings)})

    async def classify(request: Request) -> Response:
        timings = {}
        started = time.perf_counter()
        fields = await read_fields(request, limits)
        multipart = fields.pop("multipart", False)
        asked = fields.get("model")
        if multipart and isinstance(asked, list) and len(asked) == 1:  # a form field
            asked = asked[0]
        service = pick(request, asked)
        labels_value = fields.get("labels")
        if multipart and isinstance(labels_value, list):  # a labels file upload, a file name, or one label per field
            if len(labels_value) == 1 and isinstance(labels_value[0], bytes):
                try:
                    labels_value = labels_value[0].decode("utf-8-sig").splitlines()
                except UnicodeDecodeError as error:
                    raise Problem(400, "BadLabels", "the labels file is not UTF-8 text") from error
            elif len(labels_value) == 1 and labels_value[0] in service.labels_files:
                labels_value = labels_value[0]
        if labels_value is None:
            raise Problem(400, "BadRequest", "missing field 'labels'")
        labels = service.labels(labels_value)
        top_k = parse_top_k(fields.get("top_k", 5))
        given = {}
        for modality in ("audio", "image", "text"):
            if fields.get(modality) is not None:
                if modality not in service.modalities:
                    raise Problem(400, "BadModality", f"this bundle has no {modality} tower")
                given[modality] = decode_items(modality, fields[modality], modality, multipart)
        if not given:
            raise Problem(400, "BadRequest", "classify needs 'audio', 'image' or 'text' items")
        counts = {m: len(v) for m, v in given.items()}
        if len(set(counts.values())) > 1:
            raise Problem(400, "BadRequest", f"fused inputs must pair one to one, but the counts differ: {counts}")
        check_count(sum(counts.values()))
        await service.check_work(given)
        deadline = started + limits.request_timeout_s
        async with watch_disconnect(request) as gone:
            label_matrix = await service.label_matrix(labels, deadline, gone)  # [K, D]
            results = await service.embed(given, timings, deadline, gone)
        count = next(iter(counts.values()))
        nan = np.full(service.runtime.manifest.embed_dim, np.nan, np.float32)
        vectors = [np.stack([r.vector if isinstance(r, Embedded) else nan for r in rs]) for rs in results.values()]
        errors = [
            next((rs[i] for rs in results.values() if not isinstance(rs[i], Embedded)), None) for i in range(count)
        ]
        sources, fused = [f"input[{i}]" for i in range(count)], fuse_embeddings(vectors)  # [N, D]
        # the library's arithmetic (Runtime.classify), on the micro-batched embeddings
        ranked = service.runtime.rank_labels(labels, label_matrix, fused, [list(given)] * count, sources, errors, top_k)
        data = []
        for i, prediction in enumerate(ranked):
            if not prediction.ok:
                data.append(item_error(i, prediction.error))
                continue
            top = [
                {"label": s.label, "probability": round(s.probability, 6), "similarity": round(s.similarity, 6)}
                for s in prediction.top
            ]
            data.append({"index": i, "modality": "+".join(given), "ok": True, "top": top})
        body = {"data": data, "model": service.name, "labels": len(labels)}
        return JSONResponse(body, headers={"Server-Timing": server_timing(timings)})

    async def list_models(request: Request) -> Response:
        return JSONResponse(models_body([(service.name, service.started) for service in models]))

    async def model(request: Request) -> Response:
        service = pick(request, request.path_params["name"])
        return JSONResponse(model_card(service.name, service.started))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        problem = models.unready()
        if problem is not None:
            raise problem
        return JSONResponse(
            {"status": "ready", "models": {service.name: list(service.modalities) for service in models}}
        )

    async def render_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, error: HTTPException) -> Response:
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(error.status_code, "HTTPError")
        return problem_response(
            Problem(error.status_code, kind, f"{request.method} {request.url.path}: {error.detail}")
        )

    @asynccontextmanager
    async def lifespan(app):
        models.start()
        yield
        await run_in_threadpool(models.stop)

    routes = [
        Route("/v1/embeddings", endpoint("embeddings", embeddings), methods=["POST"]),
        Route("/v1/classify", endpoint("classify", classify), methods=["POST"]),
        Route("/v1/models", endpoint("models", list_models), methods=["GET"]),
        Route("/v1/models/{name:path}", endpoint("models", model), methods=["GET"]),
        Route("/healthz", endpoint("healthz", healthz), methods=["GET"]),
        Route("/readyz", endpoint("readyz", readyz), methods=["GET"]),
        Route("/metrics", render_metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
