"""A micro-batcher: callers submit one item at a time from many threads, a worker runs them in batches.

``submit(item)`` returns a ``concurrent.futures.Future`` at once. A worker takes the first waiting item, then
collects more until it has ``max_batch`` or ``max_wait_ms`` has passed since the first, and calls
``process(items) -> results`` once for the batch. A result that is an exception fails that item's future alone.
The queue is bounded (``max_queue``): when it is full, ``submit`` blocks (back-pressure) and, after ``timeout``
seconds, raises ``BatcherFull``.

Withdrawal: cancelling a queued item's future takes it out of the queue at once (it no longer holds a place, and
``len(batcher)`` counts live items only). A batch is processed ``sub_batch`` items at a time; an item's future turns
running only when its sub-batch starts, so until then it can still be cancelled and is skipped: a caller that gave up
(a timeout, a client gone) stops costing work at the next sub-batch boundary, and a batch whose items were all
withdrawn stops there. With ``sub_batch_seconds``, a sub-batch grows past ``sub_batch`` (up to ``max_batch``) while
the time per item measured so far says it takes no longer than that: cheap items then run in the larger batches
the model is faster at (`synergy serve` on the demo bundle, onnxruntime, 64 clients: 474-487 clips/s in calls of 8,
508-515 with calls averaging 16 items; benchmarks/README.md), and the work a withdrawn caller can still cost stays
bounded by time.

Results equal those of calling ``process`` directly: items are independent, so batching changes only how many
are computed together (and the runtime pads each batch so that padding never reaches another item).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future


class BatcherFull(RuntimeError):
    """The batcher's queue stayed full for the whole ``submit`` timeout."""


class MicroBatcher:
    """Collects single submissions into batches for ``process``. Use as a context manager or call ``close()``."""

    def __init__(
        self,
        process: Callable[[list], Sequence],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        workers: int = 1,
        sub_batch: int | None = None,
        sub_batch_seconds: float | None = None,
        name: str = "synergy-batcher",
    ):
        if max_batch < 1 or max_queue < 1 or workers < 1 or max_wait_ms < 0 or (sub_batch or 1) < 1:
            raise ValueError("max_batch, max_queue, workers and sub_batch must be >= 1 and max_wait_ms >= 0")
        if sub_batch_seconds is not None and not sub_batch_seconds > 0:
            raise ValueError(f"sub_batch_seconds must be > 0, got {sub_batch_seconds}")
        self.process = process
        self.max_batch = max_batch
        self.sub_batch = sub_batch or max_batch  # items per ``process`` call; cancellation is checked between calls
        self.sub_batch_seconds = sub_batch_seconds  # grow sub-batches while they stay this short (module doc)
        self._seconds_per_item: float | None = None  # measured on ``process`` calls, smoothed; read by the workers
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._pending: deque = deque()  # (item, future), oldest first
        self._changed = threading.Condition()  # guards _pending and _closed; notified on every change
        self._closed = False
        self.batches = 0  # ``process`` calls so far (a statistic for tests and benchmarks)
        self.items = 0
        self._workers = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def submit(self, item, timeout: float | None = None) -> Future:
        """Queue one item; its future resolves to ``process([... item ...])``'s entry for it. Blocks while the
        queue is full; raises ``BatcherFull`` after ``timeout`` seconds (None: wait as long as it takes)."""
        future: Future = Future()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while len(self._pending) >= self.max_queue and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BatcherFull(f"the batcher's queue ({self.max_queue} items) stayed full for {timeout} s")
                self._changed.wait(remaining)
            if self._closed:
                raise RuntimeError("the batcher is closed; create a new one")
            self._pending.append((item, future))
            self._changed.notify_all()
        future.add_done_callback(self._forget)  # runs at once in the canceller's thread (never under our lock)
        return future

    def _forget(self, future: Future) -> None:
        """A cancelled future leaves the queue now, not when a worker would have reached it."""
        if not future.cancelled():
            return
        with self._changed:
            for entry in self._pending:
                if entry[1] is future:
                    self._pending.remove(entry)
                    self._changed.notify_all()  # room for blocked submitters
                    break

    def __len__(self) -> int:
        """Items waiting in the queue (withdrawn ones are gone; a batch being processed is not counted)."""
        with self._changed:
            return len(self._pending)

    def map(self, items, timeout: float | None = None) -> list:
        """Submit every item and wait for all results (raises the first failed item's exception)."""
        return [f.result() for f in [self.submit(item, timeout) for item in items]]

    def _next_batch(self) -> list | None:
        """Wait for a first item, then up to ``max_wait`` for the batch to fill. None: closed and drained."""
        with self._changed:
            while not self._pending:
                if self._closed:
                    return None
                self._changed.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self._pending) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            self._changed.notify_all()  # room in the queue for blocked submitters
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:  # another worker may have taken the items while this one waited
                self._run(batch)

    def _run(self, batch: list) -> None:
        start = 0
        while start < len(batch):
            size = self.sub_batch_size()
            self._run_sub_batch(batch[start : start + size])
            start += size

    def sub_batch_size(self) -> int:
        """Items in the next ``process`` call: ``sub_batch``, or with ``sub_batch_seconds`` as many (up to
        ``max_batch``) as the measured time per item fits in it."""
        per_item = self._seconds_per_item
        if self.sub_batch_seconds is None or per_item is None:
            return self.sub_batch
        fits = int(self.sub_batch_seconds / per_item) if per_item > 0 else self.max_batch
        return max(self.sub_batch, min(self.max_batch, fits))

    def _run_sub_batch(self, batch: list) -> None:
        live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
        if not live:  # every item was withdrawn while earlier sub-batches ran
            return
        started = time.perf_counter()
        try:
            results = list(self.process([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"process returned {len(results)} results for {len(live)} items")
        except BaseException as error:  # a failure of the whole batch fails each of its futures
            for _, future in live:
                future.set_exception(error)
            return
        per_item = (time.perf_counter() - started) / len(live)
        with self._changed:
            self.batches += 1
            self.items += len(live)
            last = self._seconds_per_item  # smoothed over calls: one slow call (a big item) moves it by half
            self._seconds_per_item = per_item if last is None else (last + per_item) / 2
        for (_, future), result in zip(live, results):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def close(self, wait: bool = True) -> None:
        """Stop accepting items; the workers finish everything already queued, then exit."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if wait:
            for worker in self._workers:
                worker.join()

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
