"""Hostile clients against a real ``synergy serve`` process on loopback: every request is bounded before work is spent
on it, a request's work stops when it times out or its client leaves, withdrawn items free the queue, and the HTTP
edges (huge headers, slow senders, hang-ups, odd JSON) get 4xx answers or closed connections, never a 500, a
traceback or a connection held forever. Counts and limits are small (a limit of 16 labels, a 1.5 s read timeout) so
that each case shows its bug in a second or two; memory is the server's RSS from /proc."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import soundfile

from .conftest import LABELS, Server, clip_bytes, image_bytes

pytest.importorskip("starlette", reason="synergy-clip[serve] is not installed (starlette, uvicorn, python-multipart)")
pytest.importorskip("uvicorn", reason="synergy-clip[serve] is not installed")

READ_TIMEOUT = 1.5


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def plain_png(width: int, height: int) -> bytes:
    """A plain image: a few KB that decode to width x height pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile(bundle):
    """A server with small limits, so that each hostile request crosses one of them cheaply."""
    running = Server(
        bundle,
        *("--max-labels", "16", "--label-cache", "40", "--max-items", "8", "--max-body-mb", "4"),
        *("--max-audio-seconds", "20", "--max-megapixels", "2", "--read-timeout", str(READ_TIMEOUT)),
    )
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log(), running.log()[-3000:]


def raw_exchange(server: Server, data: bytes, then_wait: float = 0.0, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection, optionally wait, then read until the server closes it (or ``timeout``)."""
    with socket.create_connection(server.address, timeout=timeout) as sock:
        sock.sendall(data)
        time.sleep(then_wait)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


# ---------------------------------------------------------------------------------------------------- 1. labels


def test_labels_over_the_limit_are_refused_and_a_control_character_is_named(hostile):
    labels = [f"thing {i}" for i in range(17)]
    status, _, answer = hostile.post("/v1/classify", {"labels": labels, "text": ["dog"]})
    assert status == 413 and answer["error"]["type"] == "TooManyLabels"
    assert "17 labels" in answer["error"]["message"] and "--max-labels" in answer["error"]["message"]
    status, _, answer = hostile.post("/v1/classify", {"labels": ["dog", "ca\x00t"], "text": ["dog"]})
    assert status == 400 and answer["error"]["type"] == "BadLabels"
    assert "labels[1]" in answer["error"]["message"] and "U+0000" in answer["error"]["message"]


def test_a_body_of_many_tiny_labels_is_refused_before_it_is_parsed(hostile):
    """300,000 two-character labels (2.7 MB): refused from the body's size in values, at memory speed, while
    /healthz keeps answering; the server's memory does not grow by the parse of 300,000 strings."""
    body = json.dumps({"labels": [f"{i:x}" for i in range(300_000)], "text": ["dog"]}).encode()
    before = hostile.rss_mb()
    health: list[float] = []

    def probe() -> None:
        for _ in range(10):
            started = time.monotonic()
            assert hostile.get("/healthz")[0] == 200
            health.append(time.monotonic() - started)

    prober = threading.Thread(target=probe)
    prober.start()
    started = time.monotonic()
    status, _, answer = hostile.request("POST", "/v1/classify", body, "application/json", timeout=20)
    took = time.monotonic() - started
    prober.join(30)
    assert status == 413 and answer["error"]["type"] == "TooManyValues", answer
    assert "--max-labels" in answer["error"]["message"]
    assert took < 3.0 and max(health) < 1.0
    assert hostile.rss_mb() - before < 40  # the body itself (2.7 MB) and buffers; no 300,000 parsed strings


def test_the_label_cache_is_bounded_and_its_embeddings_equal_the_library(hostile, library):
    for round_ in range(4):  # 4 x 16 fresh labels through a 40-label cache
        labels = [f"{LABELS[i % len(LABELS)]} {round_}-{i}" for i in range(16)]
        status, _, answer = hostile.post("/v1/classify", {"labels": labels, "text": ["a dog barking"], "top_k": 16})
        assert status == 200, answer
    assert hostile.metric("synergy_label_cache_entries") == 40
    expected = library.classify(labels, text=["a dog barking"], top_k=16)[0].top
    got = answer["data"][0]["top"]
    assert [row["label"] for row in got] == [score.label for score in expected]
    np.testing.assert_allclose([row["similarity"] for row in got], [s.similarity for s in expected], atol=1e-5)


def test_embedding_labels_counts_against_the_request_timeout(bundle):
    """30,000 fresh labels take seconds to embed; the request has 0.5 s. It is answered 504 at its timeout and its
    prompts are withdrawn, so the text tower is free again at once."""
    server = Server(bundle, "--timeout", "0.5", "--max-labels", "30000")
    try:
        labels = [f"label number {i}" for i in range(30_000)]
        started = time.monotonic()
        status, _, answer = server.post("/v1/classify", {"labels": labels, "text": ["dog"]})
        assert status == 504 and answer["error"]["type"] == "Timeout", answer
        assert time.monotonic() - started < 2.5
        started = time.monotonic()
        status, _, _ = server.post("/v1/embeddings", {"modality": "text", "input": ["piano"]})
        assert status == 200 and time.monotonic() - started < 1.5  # not behind 90,000 prompts (seconds)
        assert server.metric("synergy_label_cache_entries") == 0  # a request that failed caches nothing
    finally:
        assert server.stop() == 0


# -------------------------------------------------------------------------------------------- 3. bounded work


def test_audio_below_8_khz_is_refused_by_name_not_decoded_to_minutes(hostile):
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(599, np.float32), 1, format="WAV", subtype="PCM_16")  # 1.2 KB, "599 s" at 1 Hz
    started = time.monotonic()
    status, _, answer = hostile.post("/v1/embeddings", {"modality": "audio", "input": [b64(buffer.getvalue())]})
    assert status == 200 and time.monotonic() - started < 1.0
    error = answer["data"][0]["error"]
    assert error["type"] == "UnsupportedAudio" and "sample rate 1 Hz, below the 8,000 Hz minimum" in error["message"]


def test_a_request_over_its_audio_or_pixel_budget_is_refused_before_decoding(hostile):
    clips = [b64(clip_bytes(8.0, 300 + 100 * i)) for i in range(3)]  # 24 s of audio, over the 20 s budget
    status, _, answer = hostile.post("/v1/embeddings", {"modality": "audio", "input": clips})
    assert status == 413 and answer["error"]["type"] == "TooMuchWork"
    assert "24.0 s" in answer["error"]["message"] and "--max-audio-seconds" in answer["error"]["message"]
    images = [b64(plain_png(1000, 1000)) for _ in range(3)]  # 3 megapixels in a few KB, over the 2 MP budget
    status, _, answer = hostile.post("/v1/classify", {"labels": ["dog", "cat"], "image": images})
    assert status == 413 and "--max-megapixels" in answer["error"]["message"]
    status, _, answer = hostile.post("/v1/embeddings", {"modality": "audio", "input": clips[:2]})  # 16 s: fine
    assert status == 200 and all("embedding" in row for row in answer["data"])


HEAVY = [b64(plain_png(3000, 3000)) for _ in range(32)]  # each ~0.1 s to decode and resize: 32 are seconds of work
HEAVY_OPTIONS = ("--max-batch", "32", "--max-items", "32", "--max-megapixels", "1000", "--max-wait-ms", "50")


def test_a_timed_out_request_stops_its_batch_at_the_next_sub_batch(bundle):
    server = Server(bundle, *HEAVY_OPTIONS, "--timeout", "0.3")
    try:
        status, _, answer = server.post("/v1/embeddings", {"modality": "image", "input": HEAVY})
        assert status == 504, answer
        # sub-batches of 8: the one running at the timeout finishes (and perhaps the next had begun); never all 32
        assert _items_run_before_a_probe(server, "image") <= 16
    finally:
        assert server.stop() == 0


def test_a_client_that_hangs_up_withdraws_its_work_and_is_logged_as_499(bundle):
    server = Server(bundle, *HEAVY_OPTIONS)
    try:
        body = json.dumps({"modality": "image", "input": HEAVY}).encode()
        head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(head.encode() + body)
            time.sleep(0.4)  # the batch has started; then the client goes away
        assert _items_run_before_a_probe(server, "image") <= 16
        deadline = time.monotonic() + 5
        while "499 POST /v1/embeddings" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        assert server.metric('synergy_request_errors_total{endpoint="embeddings",type="ClientClosedRequest"}') == 1
    finally:
        assert server.stop() == 0
        assert "Traceback" not in server.log()


def _items_run_before_a_probe(server: Server, modality: str) -> float:
    """Queue one small item behind whatever the tower is doing and wait for its answer: -> how many items the tower
    had run before it (the probe itself not counted)."""
    deadline = time.monotonic() + 30
    while server.post("/v1/embeddings", {"modality": modality, "input": [b64(image_bytes(20, 20, 0))]})[0] != 200:
        assert time.monotonic() < deadline  # a probe past the server's timeout is withdrawn, so it is never counted
    return server.metric(f'synergy_items_total{{modality="{modality}"}}') - 1


# ----------------------------------------------------------------------------------------- 4. withdrawn items


def test_items_of_a_timed_out_request_leave_the_queue(bundle):
    """--max-queue 4: a request of 4 items times out while its batch waits to fill; the next request's items are
    queued (the gauge counts them), not refused because the withdrawn ones still held the queue."""
    server = Server(
        bundle, *("--max-queue", "4", "--max-items", "4", "--timeout", "1", "--max-batch", "8", "--max-wait-ms", "3000")
    )
    try:
        clips = [b64(clip_bytes(0.3, 300 + 50 * i)) for i in range(4)]
        status, _, answer = server.post("/v1/embeddings", {"modality": "audio", "input": clips})
        assert status == 504 and answer["error"]["type"] == "Timeout"
        assert server.metric('synergy_queue_depth{modality="audio"}') == 0
        later: dict = {}
        sender = threading.Thread(
            target=lambda: later.update(answer=server.post("/v1/embeddings", {"modality": "audio", "input": clips}))
        )
        sender.start()
        deadline = time.monotonic() + 5
        while server.metric('synergy_queue_depth{modality="audio"}') < 4 and "answer" not in later:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sender.join(10)
        status, _, answer = later["answer"]
        assert answer["error"]["type"] != "QueueFull", answer  # it was queued; it then waited out its own timeout
    finally:
        assert server.stop() == 0


# ----------------------------------------------------------------------------------------------- 5. HTTP edges


def test_huge_headers_are_refused_and_cost_no_memory(hostile):
    before = hostile.rss_mb()
    # whole in one read: parsed, then refused by its size (431)
    answer = raw_exchange(hostile, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 20_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431") and b"HeadersTooLarge" in answer, answer[:200]
    # a head that keeps coming (4 x 8 MB, never ending): refused once 16 KB are buffered (400), not held in memory
    for _ in range(4):
        with socket.create_connection(hostile.address, timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: ")
            answer = b""
            try:
                for _ in range(128):
                    sock.sendall(b"a" * 65536)
            except OSError:  # the server answered and closed while we were still sending
                pass
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionResetError:  # closed with our unread bytes in its buffer: the answer came first
                pass
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert hostile.rss_mb() - before < 20
    assert hostile.get("/healthz")[0] == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # the head never ends
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    ],
    ids=["slow-headers", "short-body"],
)
def test_a_request_that_does_not_arrive_in_time_is_closed(hostile, request_bytes):
    started = time.monotonic()
    answer = raw_exchange(hostile, request_bytes, timeout=READ_TIMEOUT + 5)  # a socket timeout here fails the test
    assert answer == b"" and READ_TIMEOUT - 0.2 < time.monotonic() - started < READ_TIMEOUT + 3


def test_a_client_that_hangs_up_mid_body_is_a_499_line_not_a_500(hostile):
    errors = hostile.metric("synergy_request_errors_total")
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    for _ in range(3):
        with socket.create_connection(hostile.address, timeout=5) as sock:
            sock.sendall(head + b'{"modality": "text", "input": ["')
            time.sleep(0.1)
    deadline = time.monotonic() + 5
    while hostile.log().count("closed the connection while sending its body") < 3:
        assert time.monotonic() < deadline, hostile.log()
        time.sleep(0.05)
    assert hostile.metric("synergy_request_errors_total") == errors + 3
    assert 'code="500"' not in hostile.get("/metrics")[2]
    assert "Traceback" not in hostile.log()


@pytest.mark.parametrize(
    ("payload", "path", "error_type", "words"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "/v1/embeddings", "MalformedJSON", "nests too deeply"),
        (b'{"labels": ["dog", "cat"], "text": ["dog"], "top_k": 1.5}', "/v1/classify", "BadRequest", "1.5"),
        (b'{"labels": ["dog", "cat"], "text": ["dog"], "top_k": true}', "/v1/classify", "BadRequest", "True"),
    ],
    ids=["nested", "top_k-float", "top_k-bool"],
)
def test_odd_json_is_a_400_that_says_why(hostile, payload, path, error_type, words):
    status, _, answer = hostile.request("POST", path, payload, "application/json")
    assert (status, answer["error"]["type"]) == (400, error_type), answer
    assert words in answer["error"]["message"]


def test_the_server_still_answers_correctly_after_the_hostile_clients(hostile, library):
    clip = clip_bytes(0.5, 440)
    status, _, answer = hostile.post("/v1/embeddings", {"modality": "audio", "input": [b64(clip)]})
    assert status == 200
    np.testing.assert_allclose(answer["data"][0]["embedding"], library.embed_audio([clip])[0], atol=2e-6)
