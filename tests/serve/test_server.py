"""``synergy serve`` as a real process on a loopback port: answers equal the library's, concurrent clients are
batched together and still get their own answers, bad requests get 4xx JSON, a full queue gets 503, SIGTERM drains."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from .conftest import LABELS, Server, clip_bytes, image_bytes

pytest.importorskip("starlette", reason="synergy-clip[serve] is not installed (starlette, uvicorn, python-multipart)")
pytest.importorskip("uvicorn", reason="synergy-clip[serve] is not installed")

ATOL = 2e-6  # batched vs one-at-a-time onnxruntime: float rounding only


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def multipart(fields: list[tuple[str, str | tuple[str, bytes]]]) -> tuple[bytes, str]:
    """[(name, text) | (name, (filename, bytes))] -> (body, content type), as curl -F sends it."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields:
        if isinstance(value, tuple):
            head = f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
            parts.append(f"--{boundary}\r\n{head}Content-Type: application/octet-stream\r\n\r\n".encode() + value[1])
        else:
            head = f'Content-Disposition: form-data; name="{name}"\r\n\r\n'
            parts.append(f"--{boundary}\r\n{head}".encode() + value.encode())
    body = b"\r\n".join(parts) + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


CLIPS = [clip_bytes(s, f) for s, f in ((0.5, 220), (0.21, 330), (1.3, 440), (0.8, 550), (0.35, 660), (2.0, 990))]
IMAGES = [image_bytes(w, h, seed) for seed, (w, h) in enumerate(((37, 37), (64, 30), (20, 90)))]
TEXTS = ["a dog barking in the rain", "piano", "the sound of a bird song"]


def test_embeddings_equal_the_library(server, library):
    for modality, items, sent in (
        ("audio", CLIPS, [b64(c) for c in CLIPS]),
        ("image", IMAGES, [b64(i) for i in IMAGES]),
        ("text", TEXTS, TEXTS),
    ):
        status, headers, body = server.post("/v1/embeddings", {"modality": modality, "input": sent})
        assert status == 200, body
        assert body["dim"] == library.manifest.embed_dim and body["model"] == "tiny"
        expected = library.embed_batch(modality, items).vectors
        got = np.array([row["embedding"] for row in body["data"]], np.float32)
        assert [row["index"] for row in body["data"]] == list(range(len(items)))
        np.testing.assert_allclose(got, expected, atol=ATOL)
        assert "queue;dur=" in headers["Server-Timing"]


def test_a_bad_item_fails_alone(server, library):
    items = [b64(CLIPS[0]), b64(b"not audio at all"), b64(CLIPS[2])]
    status, _, body = server.post("/v1/embeddings", {"modality": "audio", "input": items})
    assert status == 200
    good, bad, other = body["data"]
    assert bad["index"] == 1 and bad["error"]["type"] == "UnsupportedAudio" and "input[1]" in bad["error"]["message"]
    np.testing.assert_allclose(good["embedding"], library.embed_audio([CLIPS[0]])[0], atol=ATOL)
    np.testing.assert_allclose(other["embedding"], library.embed_audio([CLIPS[2]])[0], atol=ATOL)


def test_multipart_upload_equals_json(server, library):
    body, kind = multipart([("modality", "audio"), ("input", ("a.wav", CLIPS[1])), ("input", ("b.wav", CLIPS[3]))])
    status, _, answer = server.request("POST", "/v1/embeddings", body, kind)
    assert status == 200, answer
    expected = library.embed_audio([CLIPS[1], CLIPS[3]])
    np.testing.assert_allclose([row["embedding"] for row in answer["data"]], expected, atol=ATOL)


def _top(prediction) -> list[tuple[str, float, float]]:
    return [(s.label, s.probability, s.similarity) for s in prediction.top]


def _check_classify(answer, predictions):
    assert len(answer["data"]) == len(predictions)
    for row, prediction in zip(answer["data"], predictions):
        got = [(t["label"], t["probability"], t["similarity"]) for t in row["top"]]
        assert [g[0] for g in got] == [e[0] for e in _top(prediction)]
        np.testing.assert_allclose([g[1:] for g in got], [e[1:] for e in _top(prediction)], atol=1e-5)


def test_classify_equals_the_library(server, library, labels_file):
    audio, images = CLIPS[:3], IMAGES
    status, _, answer = server.post(
        "/v1/classify",
        {"labels": list(LABELS), "audio": [b64(a) for a in audio], "image": [b64(i) for i in images], "top_k": 3},
    )
    assert status == 200, answer
    _check_classify(answer, library.classify(list(LABELS), audio=audio, image=images, top_k=3))
    assert answer["data"][0]["modality"] == "audio+image"

    # a labels file the server was started with, by name; and the multipart form with the file uploaded
    status, _, answer = server.post("/v1/classify", {"labels": "animals", "audio": [b64(CLIPS[4])], "top_k": 2})
    assert status == 200, answer
    _check_classify(answer, library.classify(labels_file, audio=[CLIPS[4]], top_k=2))
    body, kind = multipart(
        [("labels", ("animals.txt", labels_file.read_bytes())), ("image", ("p.png", IMAGES[1])), ("top_k", "4")]
    )
    status, _, answer = server.request("POST", "/v1/classify", body, kind)
    assert status == 200, answer
    _check_classify(answer, library.classify(labels_file, image=[IMAGES[1]], top_k=4))


def test_16_threads_x_50_requests_equal_serial_calls(server, library):
    expected = library.embed_batch("audio", CLIPS).vectors  # serial: the library, one call
    text_expected = library.embed_text(TEXTS)
    batches_before = server.metric('synergy_batch_size_count{modality="audio"}')
    items_before = server.metric('synergy_items_total{modality="audio"}')

    def client(worker: int) -> list[str]:
        wrong = []
        for n in range(50):
            if (worker + n) % 5 == 4:
                index = (worker + n) % len(TEXTS)
                status, _, body = server.post("/v1/embeddings", {"modality": "text", "input": [TEXTS[index]]})
                want = text_expected[index]
            else:
                index = (worker * 7 + n) % len(CLIPS)
                status, _, body = server.post("/v1/embeddings", {"modality": "audio", "input": [b64(CLIPS[index])]})
                want = expected[index]
            if status != 200 or not np.allclose(body["data"][0]["embedding"], want, atol=ATOL):
                wrong.append(f"worker {worker} request {n}: {status} {str(body)[:200]}")
        return wrong

    with ThreadPoolExecutor(16) as pool:
        wrong = [w for ws in pool.map(client, range(16)) for w in ws]
    assert not wrong, wrong[:5]
    batches = server.metric('synergy_batch_size_count{modality="audio"}') - batches_before
    items = server.metric('synergy_items_total{modality="audio"}') - items_before
    assert items == 640
    assert batches < items, "no two clients' items were ever batched together"


MALFORMED = [  # (body, content type, status, error type)
    (b"{not json", "application/json", 400, "MalformedJSON"),
    (b"[1, 2]", "application/json", 400, "MalformedJSON"),
    (b'{"modality": "audio", "input": ["***"]}', "application/json", 400, "BadBase64"),
    (b'{"modality": "smell", "input": ["abc"]}', "application/json", 400, "BadModality"),
    (b'{"modality": "audio"}', "application/json", 400, "BadRequest"),
    (b'{"modality": "audio", "input": []}', "application/json", 400, "BadRequest"),
    (b'{"modality": "text", "input": [1]}', "application/json", 400, "BadRequest"),
    (b'{"modality": "text", "input": ["a","b","c","d","e","f","g","h","i"]}', "application/json", 413, "TooManyItems"),
    (b'{"modality": "text", "input": ["a"]}', "application/xml", 415, "UnsupportedMediaType"),
]
MALFORMED_CLASSIFY = [
    ({"labels": "no-such-file", "text": ["a"]}, 400, "UnknownLabels"),
    ({"labels": ["dog", "Dog"], "text": ["a"]}, 400, "BadLabels"),
    ({"labels": ["dog"]}, 400, "BadRequest"),
    ({"labels": ["dog"], "text": ["a"], "top_k": 0}, 400, "BadRequest"),
    ({"labels": ["dog"], "text": ["a"], "top_k": True}, 400, "BadRequest"),  # not 1: a bool is not a count
    ({"labels": ["dog"], "text": ["a"], "audio": []}, 400, "BadRequest"),
    ({"text": ["a"]}, 400, "BadRequest"),
]


def test_malformed_requests_get_4xx_json_and_the_server_keeps_answering(server, library):
    for body, kind, status, error_type in MALFORMED:
        got, _, answer = server.request("POST", "/v1/embeddings", body, kind)
        assert (got, answer["error"]["type"]) == (status, error_type), (body[:60], answer)
        assert answer["error"]["message"]
    for payload, status, error_type in MALFORMED_CLASSIFY:
        got, _, answer = server.post("/v1/classify", payload)
        assert (got, answer["error"]["type"]) == (status, error_type), (payload, answer)
    # a body over --max-body-mb is refused from its Content-Length, before it is read (headers only: a client still
    # sending a body the server will not read may see the connection reset instead of the answer)
    connection = http.client.HTTPConnection(server.url.split("//")[1].split(":")[0], int(server.url.rsplit(":", 1)[1]))
    connection.putrequest("POST", "/v1/embeddings")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(1024 * 1024 + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["type"] == "BodyTooLarge"
    connection.close()
    assert server.request("GET", "/nope")[2]["error"]["type"] == "NotFound"
    assert server.request("GET", "/v1/embeddings")[2]["error"]["type"] == "MethodNotAllowed"
    status, _, answer = server.post("/v1/embeddings", {"modality": "text", "input": ["piano"]})
    assert status == 200
    np.testing.assert_allclose(answer["data"][0]["embedding"], library.embed_text(["piano"])[0], atol=ATOL)


def test_health_readiness_and_metrics(server):
    assert server.get("/healthz")[:1] == (200,)
    status, _, ready = server.get("/readyz")
    assert status == 200 and list(ready["models"]) == ["tiny"]
    assert sorted(ready["models"]["tiny"]) == ["audio", "image", "text"]
    server.post("/v1/embeddings", {"modality": "text", "input": ["dog"]})
    status, headers, text = server.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in (
        'synergy_requests_total{code="200",endpoint="embeddings",model="tiny"}',  # each model's series apart
        'synergy_batch_size_bucket{modality="text",model="tiny",le="+Inf"}',
        'synergy_request_seconds_count{endpoint="embeddings",model="tiny"}',
        'synergy_requests_total{code="200",endpoint="healthz"}',  # no model: the route serves none
        'synergy_queue_depth{modality="audio",model="tiny"} 0',
        "# TYPE synergy_request_seconds histogram",
    ):
        assert name in text, name


def test_a_full_queue_gets_503_with_retry_after(bundle, library):
    # a batch waits up to 2 s to fill 16 items, so 4 queued items hold the 4-item queue full meanwhile
    server = Server(bundle, "--max-queue", "4", "--max-items", "4", "--max-batch", "16", "--max-wait-ms", "2000")
    try:
        results = {}
        first = threading.Thread(
            target=lambda: results.setdefault(
                "first", server.post("/v1/embeddings", {"modality": "audio", "input": [b64(c) for c in CLIPS[:4]]})
            )
        )
        first.start()
        deadline = time.monotonic() + 10
        while server.metric('synergy_queue_depth{modality="audio"}') < 4:
            assert time.monotonic() < deadline, "the first request never filled the queue"
            time.sleep(0.01)
        status, headers, answer = server.post("/v1/embeddings", {"modality": "audio", "input": [b64(CLIPS[5])]})
        assert status == 503 and headers["Retry-After"] == "1" and answer["error"]["type"] == "QueueFull"
        first.join(30)
        status, _, answer = results["first"]
        assert status == 200
        expected = library.embed_batch("audio", CLIPS[:4]).vectors
        np.testing.assert_allclose([r["embedding"] for r in answer["data"]], expected, atol=ATOL)
        assert server.post("/v1/embeddings", {"modality": "text", "input": ["dog"]})[0] == 200  # another queue
        assert server.metric('synergy_queue_depth{modality="audio"}') == 0  # the refused item left no trace
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_requests_in_flight(bundle, library):
    server = Server(bundle, "--max-batch", "64", "--max-wait-ms", "1500")
    answers = [None] * 4

    def send(i: int) -> None:
        answers[i] = server.post("/v1/embeddings", {"modality": "audio", "input": [b64(CLIPS[i])]})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while server.metric('synergy_queue_depth{modality="audio"}') < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.process.send_signal(signal.SIGTERM)  # all four wait in the batcher: none has an answer yet
    for thread in threads:
        thread.join(30)
    assert server.process.wait(timeout=30) == 0
    assert "synergy serve: stopped" in server.log()
    expected = library.embed_batch("audio", CLIPS[:4]).vectors
    for (status, _, answer), want in zip(answers, expected):
        assert status == 200
        np.testing.assert_allclose(answer["data"][0]["embedding"], want, atol=ATOL)


def test_usage_errors_exit_2_and_imports_stay_apart(tmp_path, bundle):
    missing = subprocess.run(
        [sys.executable, "-m", "synergy.cli", "serve", "--bundle", str(tmp_path / "nope"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "Error:" in missing.stderr
    too_many = subprocess.run(
        [sys.executable, "-m", "synergy.cli", "serve", "--bundle", str(bundle), "--max-items", "9", "--max-queue", "8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert too_many.returncode == 2 and "--max-queue" in too_many.stderr
    check = (
        "import sys, synergy.runtime, synergy.cli; assert 'synergy.serve' not in sys.modules; "
        "import synergy.serve.app, synergy.serve.ann, synergy.serve.corpus, synergy.serve.search; "
        "import synergy.serve.server, usearch.index; "
        "assert 'torch' not in sys.modules, 'serve imported torch'"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)


def test_a_request_past_its_timeout_gets_504_and_its_items_are_withdrawn(bundle):
    # a batch waits up to 3 s to fill 64 items; the request may take 0.3 s
    server = Server(bundle, "--max-batch", "64", "--max-wait-ms", "3000", "--timeout", "0.3")
    try:
        started = time.monotonic()
        status, _, answer = server.post("/v1/embeddings", {"modality": "audio", "input": [b64(CLIPS[0])]})
        assert status == 504 and answer["error"]["type"] == "Timeout"
        assert time.monotonic() - started < 2.5  # answered at its timeout, not when the batch ran
        assert server.get("/healthz")[0] == 200
        assert server.metric('synergy_queue_depth{modality="audio"}') == 0  # the withdrawn item left the queue
    finally:
        assert server.stop() == 0
