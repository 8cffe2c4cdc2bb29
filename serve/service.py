"""One served model at run time: its runtime, one micro-batcher per tower, its label cache, and the checks of a
request's work before it is queued."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from starlette.concurrency import run_in_threadpool

from synergy.runtime import (
    BatcherFull,
    InputError,
    LabelCache,
    LabelsError,
    MicroBatcher,
    Runtime,
    mean_embeddings,
    prompts_of,
    read_labels,
)

from .budget import request_work
from .labels import control_character
from .metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS, Metrics
from .problems import Problem
from .requests import PARSE_INLINE_BYTES, check_label_count

if TYPE_CHECKING:  # app.py imports this module (through endpoints.py)
    from .app import ServeLimits

logger = logging.getLogger("synergy.serve")


@dataclass(frozen=True)
class Embedded:
    """One item's embedding and the batch that computed it (times from ``time.perf_counter``)."""

    vector: np.ndarray
    started: float
    finished: float
    batch_size: int


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
                sub_batch_seconds=limits.cancel_seconds,
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
        futures = self._queue(requests)
        done = await self._answers(futures, deadline, gone)
        record_timings(timings, done, submitted)
        answers, start = {}, 0
        for modality, items in requests.items():
            answers[modality] = list(done[start : start + len(items)])
            start += len(items)
        return answers

    def _queue(self, requests: dict[str, list]) -> dict[str, list]:
        """Queue every modality's items or none: {modality: futures}."""
        futures: dict[str, list] = {}
        try:
            for modality, items in requests.items():
                futures[modality] = self.submit_all(modality, items)
        except Problem:
            self.withdraw(futures)  # the modalities queued before the one that was full
            raise
        return futures

    async def _answers(self, futures: dict[str, list], deadline: float, gone: asyncio.Future) -> list:
        """Every item's answer (Embedded or InputError) in queued order, or 504 / 499 with the items withdrawn; a
        batch that failed whole (a backend error) is a 500."""
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
        return done

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
        """413 when the request's audio seconds or image pixels (from the files' headers) are over the budget. The
        headers of a small request are read on the event loop, like its JSON (``requests.PARSE_INLINE_BYTES``): under
        load the wait for a worker thread cost more than the read (the demo bundle to 64 clients: 621-674 clips/s
        through a worker, 708-723 inline, benchmarks/README.md); larger requests go to a worker."""
        size = sum(len(item) for items in given.values() for item in items if isinstance(item, bytes))
        if size <= PARSE_INLINE_BYTES:
            seconds, pixels = request_work(given)
        else:
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


def record_timings(timings: dict, done: list, submitted: float) -> None:
    """The request's ``Server-Timing``: its longest queue wait and batch, and its largest batch (embedded items)."""
    good = [r for r in done if isinstance(r, Embedded)]
    if good:
        timings["queue"] = max(r.started for r in good) - submitted
        timings["batch"] = max(r.finished - r.started for r in good)
        timings["batch_size"] = max(r.batch_size for r in good)
