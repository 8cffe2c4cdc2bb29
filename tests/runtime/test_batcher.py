"""The micro-batcher: many threads, one item each, batched; results identical to direct calls; back-pressure."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from synergy.runtime import BatcherFull, MicroBatcher, UnsupportedAudio

from .conftest import SAMPLE_RATE, tone


def test_16_threads_x_200_calls_equal_serial_calls(runtime):
    items = [(tone(0.1 + 0.05 * (i % 9), freq=150 + 37 * i), SAMPLE_RATE) for i in range(48)]
    serial = [runtime.embed_audio([item])[0] for item in items]  # one direct call per item
    with runtime.batcher("audio", max_batch=16, max_wait_ms=1.0) as batcher:

        def client(thread: int) -> list:
            order = np.random.default_rng(thread).integers(0, len(items), 200)
            futures = [(int(i), batcher.submit(items[i])) for i in order]
            return [(i, f.result(timeout=60)) for i, f in futures]

        with ThreadPoolExecutor(16) as pool:
            results = [r for thread in pool.map(client, range(16)) for r in thread]
    assert len(results) == 16 * 200
    for index, vector in results:
        np.testing.assert_array_equal(vector, serial[index])
    assert batcher.items == 3200 and batcher.batches < 3200  # it did batch
    assert batcher.items / batcher.batches > 2


def test_bad_item_fails_its_future_only(runtime, tmp_path):
    with runtime.batcher("audio", max_wait_ms=20.0) as batcher:
        good = batcher.submit((tone(0.2), SAMPLE_RATE))
        bad = batcher.submit(tmp_path / "missing.wav")
        assert good.result(timeout=30).shape == (runtime.manifest.embed_dim,)
        with pytest.raises(UnsupportedAudio, match=r"missing.wav: no such file"):
            bad.result(timeout=30)


def test_batches_respect_max_batch_and_wait():
    sizes = []

    def process(items):
        sizes.append(len(items))
        return [x * 2 for x in items]

    with MicroBatcher(process, max_batch=5, max_wait_ms=50.0) as batcher:
        futures = [batcher.submit(i) for i in range(12)]
        assert [f.result(timeout=10) for f in futures] == [2 * i for i in range(12)]
    assert max(sizes) <= 5 and sum(sizes) == 12
    with MicroBatcher(process, max_batch=64, max_wait_ms=5.0) as batcher:
        start = time.monotonic()
        assert batcher.submit(21).result(timeout=10) == 42  # a lone item waits max_wait, not for a full batch
        assert time.monotonic() - start < 2.0


def test_a_failing_batch_fails_all_its_futures_and_the_batcher_goes_on():
    calls = []

    def process(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("model crashed")
        return [ValueError("odd") if x % 2 else x for x in items]

    with MicroBatcher(process, max_batch=4, max_wait_ms=30.0) as batcher:
        first = [batcher.submit(i) for i in range(3)]
        for future in first:
            with pytest.raises(RuntimeError, match="model crashed"):
                future.result(timeout=10)
        assert batcher.submit(4).result(timeout=10) == 4
        with pytest.raises(ValueError, match="odd"):
            batcher.submit(5).result(timeout=10)


def test_bounded_queue_applies_back_pressure():
    release = threading.Event()

    def process(items):
        release.wait(10)
        return items

    batcher = MicroBatcher(process, max_batch=1, max_wait_ms=0.0, max_queue=2)
    try:
        first = batcher.submit(0)
        time.sleep(0.05)  # the worker takes item 0 and blocks in process
        queued = [batcher.submit(1), batcher.submit(2)]  # fills the queue
        with pytest.raises(BatcherFull, match="stayed full"):
            batcher.submit(3, timeout=0.05)
        release.set()
        assert [f.result(timeout=10) for f in [first, *queued]] == [0, 1, 2]
        assert batcher.submit(4, timeout=5).result(timeout=10) == 4
    finally:
        release.set()
        batcher.close()


def test_close_drains_the_queue_then_refuses():
    batcher = MicroBatcher(lambda items: [x + 1 for x in items], max_batch=3, max_wait_ms=100.0)
    futures = [batcher.submit(i) for i in range(7)]
    batcher.close()
    assert [f.result(timeout=1) for f in futures] == list(range(1, 8))
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def test_a_cancelled_item_leaves_the_queue_at_once():
    release = threading.Event()

    def process(items):
        release.wait(10)
        return items

    batcher = MicroBatcher(process, max_batch=1, max_wait_ms=0.0, max_queue=2)
    try:
        first = batcher.submit(0)
        time.sleep(0.05)  # the worker holds item 0
        withdrawn = [batcher.submit(1), batcher.submit(2)]  # the queue is full
        assert len(batcher) == 2
        assert all(f.cancel() for f in withdrawn)
        assert len(batcher) == 0  # gone now, not when the worker would reach them
        kept = [batcher.submit(3, timeout=0), batcher.submit(4, timeout=0)]  # their places are free
        release.set()
        assert [f.result(timeout=10) for f in [first, *kept]] == [0, 3, 4]
        assert batcher.items == 3  # the withdrawn items were never processed
    finally:
        release.set()
        batcher.close()


def test_withdrawn_items_stop_a_batch_at_the_next_sub_batch():
    started, release, calls = threading.Event(), threading.Event(), []

    def process(items):
        calls.append(list(items))
        started.set()
        release.wait(10)
        return items

    batcher = MicroBatcher(process, max_batch=12, max_wait_ms=200.0, sub_batch=4)
    try:
        futures = [batcher.submit(i) for i in range(12)]  # one batch of 12: three sub-batches of 4
        assert started.wait(10)
        assert [f.cancel() for f in futures] == [False] * 4 + [True] * 8  # the running sub-batch cannot be
        release.set()
        assert [f.result(timeout=10) for f in futures[:4]] == [0, 1, 2, 3]
        batcher.close()
        assert calls == [[0, 1, 2, 3]]  # the two later sub-batches never ran
    finally:
        release.set()
        batcher.close()


def test_cheap_items_grow_the_sub_batch_and_costly_ones_keep_it():
    """With sub_batch_seconds a sub-batch grows past sub_batch (up to max_batch) when the time per item measured so
    far fits it in that time; items that cost more keep it at sub_batch, the bound on a withdrawn caller's work."""
    # 28 cheap items: batches of 12, 12, 4; the first call has nothing measured (4), then the rest of that batch (8)
    # and a whole batch in one call. 100 ms an item: 4 items are past 0.3 s, so calls stay at 4.
    for cost, count, want in ((0.0, 28, [4, 8, 12, 4]), (0.1, 12, [4, 4, 4])):
        sizes = []

        def process(items, cost=cost, sizes=sizes):
            sizes.append(len(items))
            time.sleep(cost * len(items))
            return items

        batcher = MicroBatcher(process, max_batch=12, max_wait_ms=500.0, sub_batch=4, sub_batch_seconds=0.3)
        try:
            assert batcher.sub_batch_size() == 4  # nothing measured yet
            futures = [batcher.submit(i) for i in range(count)]
            assert [f.result(timeout=30) for f in futures] == list(range(count))
        finally:
            batcher.close()
        assert sizes == want, (cost, sizes)
    with pytest.raises(ValueError, match="sub_batch_seconds"):
        MicroBatcher(lambda items: items, sub_batch_seconds=0)
