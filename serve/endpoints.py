"""The HTTP handlers of ``synergy serve`` (embeddings, classify, models, health, readiness, metrics) and the wrapper
that times each request, counts it and answers its errors as JSON."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from synergy.runtime import InputError
from synergy.runtime.search import fuse_embeddings

from .metrics import CONTENT_TYPE
from .openai_api import embedding_options, embeddings_body, encode_vector, model_card, models_body
from .problems import Problem, problem_response
from .requests import check_count, decode_items, parse_top_k, read_fields, watch_disconnect
from .routing import Models
from .service import Embedded, Service

if TYPE_CHECKING:  # app.py imports this module
    from .app import ServeLimits

logger = logging.getLogger("synergy.serve")
Handler = Callable[[Request], Awaitable[Response]]


class Endpoints:
    """The handlers over the served models and the request limits. ``wrap`` gives a handler its timing, its counts
    in the metrics and its error mapping."""

    def __init__(self, models: Models, limits: ServeLimits):
        self.models = models
        self.limits = limits
        self.metrics = models.metrics

    # ---------------------------------------------------------------------------------------------- the wrapper

    def wrap(self, name: str, handler: Handler) -> Handler:
        """``handler`` timed and counted under the endpoint ``name``, with every error answered as JSON."""
        metrics = self.metrics

        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            request.state.model = None  # set by ``pick`` once the request names a served model
            try:
                response = await handler(request)
            except ClientDisconnect:  # hung up mid-body (or closed for reading too slowly): not a server error
                response = self.client_gone(request, name, "while sending its body")
            except Problem as problem:
                if problem.status == 499:
                    response = self.client_gone(request, name, "while its request was worked on")
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

    def client_gone(self, request: Request, name: str, when: str) -> Response:
        """nginx's 499: logged in one line and counted; the answer goes nowhere."""
        client = f"{request.client[0]}:{request.client[1]}" if request.client else "a client"
        logger.warning("499 %s %s: %s closed the connection %s", request.method, request.url.path, client, when)
        self.metrics.inc("synergy_request_errors_total", **metric_labels(request, name), type="ClientClosedRequest")
        return Response(status_code=499)

    def pick(self, request: Request, asked) -> Service:
        """The served model a request names (its ``model`` field), remembered for the request's metric labels."""
        service = self.models.pick(asked)
        request.state.model = service.name
        return service

    # ------------------------------------------------------------------------------------------------ the work

    async def embeddings(self, request: Request) -> Response:
        timings = {}
        started = time.perf_counter()
        fields = await read_fields(request, self.limits)
        multipart = fields.pop("multipart", False)
        fields = {k: v[0] if multipart and k != "input" and len(v) == 1 else v for k, v in fields.items()}
        service = self.pick(request, fields.get("model"))
        dim = service.runtime.manifest.embed_dim
        options = embedding_options(fields, service.name, dim, Problem)
        modality = fields.get("modality", "text")  # OpenAI's clients send text without one
        if modality not in service.modalities:
            raise Problem(400, "BadModality", f"modality must be one of {list(service.modalities)}, got {modality!r}")
        if "input" not in fields:
            raise Problem(400, "BadRequest", "missing field 'input'")
        items = decode_items(modality, fields["input"], "input", multipart)
        check_count(len(items), self.limits.max_items)
        await service.check_work({modality: items})
        timings["parse"] = time.perf_counter() - started
        async with watch_disconnect(request) as gone:
            deadline = started + self.limits.request_timeout_s
            results = (await service.embed({modality: items}, timings, deadline, gone))[modality]
        data = [
            {"index": i, "embedding": encode_vector(r.vector, options.encoding_format)}
            if isinstance(r, Embedded)
            else item_error(i, r)
            for i, r in enumerate(results)
        ]
        tokens = await run_in_threadpool(service.count_tokens, items) if modality == "text" else 0
        body = embeddings_body(data, service.name, dim, tokens)
        return JSONResponse(body, headers={"Server-Timing": server_timing(timings)})

    async def classify(self, request: Request) -> Response:
        timings = {}
        started = time.perf_counter()
        fields = await read_fields(request, self.limits)
        multipart = fields.pop("multipart", False)
        asked = fields.get("model")
        if multipart and isinstance(asked, list) and len(asked) == 1:  # a form field
            asked = asked[0]
        service = self.pick(request, asked)
        labels = service.labels(labels_field(fields, multipart, service))
        top_k = parse_top_k(fields.get("top_k", 5))
        given = classify_inputs(fields, multipart, service)
        check_count(sum(len(items) for items in given.values()), self.limits.max_items)
        await service.check_work(given)
        deadline = started + self.limits.request_timeout_s
        async with watch_disconnect(request) as gone:
            label_matrix = await service.label_matrix(labels, deadline, gone)  # [K, D]
            results = await service.embed(given, timings, deadline, gone)
        data = ranked(service, labels, label_matrix, results, top_k)
        body = {"data": data, "model": service.name, "labels": len(labels)}
        return JSONResponse(body, headers={"Server-Timing": server_timing(timings)})

    # ------------------------------------------------------------------------------------- models and health

    async def list_models(self, request: Request) -> Response:
        return JSONResponse(models_body([(service.name, service.started) for service in self.models]))

    async def model(self, request: Request) -> Response:
        service = self.pick(request, request.path_params["name"])
        return JSONResponse(model_card(service.name, service.started))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        problem = self.models.unready()
        if problem is not None:
            raise problem
        return JSONResponse(
            {"status": "ready", "models": {service.name: list(service.modalities) for service in self.models}}
        )

    async def render_metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


def metric_labels(request: Request, name: str) -> dict:
    """A request's metric labels: its endpoint, and its model once known (not for /healthz or a 404 model)."""
    model = request.state.model
    return {"endpoint": name} if model is None else {"endpoint": name, "model": model}


# ------------------------------------------------------------------------------------------- classify's steps


def labels_field(fields: dict, multipart: bool, service: Service):
    """/v1/classify's ``labels`` field as ``Service.labels`` takes it. A form sends a labels file upload (its lines),
    the name of a ``--labels`` file, or one label per field."""
    value = fields.get("labels")
    if multipart and isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], bytes):
            try:
                value = value[0].decode("utf-8-sig").splitlines()
            except UnicodeDecodeError as error:
                raise Problem(400, "BadLabels", "the labels file is not UTF-8 text") from error
        elif len(value) == 1 and value[0] in service.labels_files:
            value = value[0]
    if value is None:
        raise Problem(400, "BadRequest", "missing field 'labels'")
    return value


def classify_inputs(fields: dict, multipart: bool, service: Service) -> dict[str, list]:
    """/v1/classify's items, {modality: items}: one modality, or several fused, paired one to one."""
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
    return given


def ranked(service: Service, labels, label_matrix: np.ndarray, results: dict[str, list], top_k: int) -> list[dict]:
    """The micro-batched embeddings ({modality: [Embedded | InputError]}) fused per input and ranked against the
    labels ([K, D]) by the library's arithmetic (``Runtime.classify``): each input's top labels, or its error."""
    modalities = list(results)
    count = len(results[modalities[0]])
    nan = np.full(service.runtime.manifest.embed_dim, np.nan, np.float32)
    vectors = [np.stack([r.vector if isinstance(r, Embedded) else nan for r in rs]) for rs in results.values()]
    errors = [next((rs[i] for rs in results.values() if not isinstance(rs[i], Embedded)), None) for i in range(count)]
    sources, fused = [f"input[{i}]" for i in range(count)], fuse_embeddings(vectors)  # [N, D]
    predictions = service.runtime.rank_labels(labels, label_matrix, fused, [modalities] * count, sources, errors, top_k)
    data = []
    for i, prediction in enumerate(predictions):
        if not prediction.ok:
            data.append(item_error(i, prediction.error))
            continue
        top = [
            {"label": s.label, "probability": round(s.probability, 6), "similarity": round(s.similarity, 6)}
            for s in prediction.top
        ]
        data.append({"index": i, "modality": "+".join(modalities), "ok": True, "top": top})
    return data


# ----------------------------------------------------------------------------------------------- the answers


def item_error(index: int, error: BaseException) -> dict:
    message = error.problem if isinstance(error, InputError) else str(error)
    return {"index": index, "error": {"type": type(error).__name__, "message": f"input[{index}]: {message}"}}


def server_timing(timings: dict) -> str:
    parts = [f"{k};dur={v * 1000:.3f}" for k, v in timings.items() if k != "batch_size"]
    if "batch_size" in timings:
        parts.append(f"batch_size;desc={timings['batch_size']}")
    return ", ".join(parts)
