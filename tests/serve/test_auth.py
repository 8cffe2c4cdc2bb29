"""API keys and CORS (serve/auth.py) on real ``synergy serve`` processes: no key or a wrong one is a 401 JSON error
with ``WWW-Authenticate: Bearer`` on every route but /healthz and /readyz, any configured key is accepted (the stock
``openai`` client's ``api_key`` too), no key reaches the log, and a CORS preflight from an allowed origin gets the
CORS headers while one from another origin does not."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import Server

openai = pytest.importorskip("openai", reason="the openai client is not installed (synergy-clip[dev])")
pytest.importorskip("starlette", reason="synergy-clip[serve] is not installed (starlette, uvicorn, python-multipart)")

ATOL = 2e-6
KEYS = ("right-key-0123456789", "second-key-abcdef")
ORIGIN = "https://app.example.com"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def guarded(bundle):
    """Two keys from the environment variable (space-separated), one allowed browser origin."""
    running = Server(bundle, "--cors-origin", ORIGIN, env={"SYNERGY_API_KEY": " ".join(KEYS)})
    yield running
    assert running.stop() == 0
    log = running.log()
    assert not any(key in log for key in KEYS) and "wrong-key" not in log  # no key, right or wrong, is logged


def openai_client(server: Server, key: str):
    http = openai.DefaultHttpxClient(trust_env=False)  # a proxy set in the environment must not see loopback
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, http_client=http, max_retries=0)


def test_without_a_key_every_route_but_the_probes_is_401(guarded):
    for method, path in (("POST", "/v1/embeddings"), ("POST", "/v1/classify"), ("GET", "/v1/models"),
                         ("GET", "/v1/models/tiny"), ("GET", "/metrics"), ("GET", "/nope")):  # fmt: skip
        status, headers, answer = guarded.request(method, path, b"{}" if method == "POST" else None)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", (path, answer)
        assert answer["error"]["type"] == "Unauthorized" and "Authorization: Bearer" in answer["error"]["message"]
    assert guarded.get("/healthz")[0] == 200
    status, _, ready = guarded.get("/readyz")
    assert status == 200 and list(ready["models"]) == ["tiny"]


def test_a_wrong_key_is_refused_and_any_right_one_accepted(guarded, library):
    for headers in (bearer("wrong-key"), bearer(KEYS[0][:-1]), bearer(KEYS[0] + "0"), {"Authorization": KEYS[0]},
                    {"Authorization": f"Basic {KEYS[0]}"}):  # fmt: skip
        status, _, answer = guarded.post("/v1/embeddings", {"input": ["piano"]}, headers)
        assert status == 401 and answer["error"]["type"] == "Unauthorized", headers
        assert KEYS[0] not in str(answer) and "wrong-key" not in str(answer)  # the answer never echoes a token
    for headers in (bearer(KEYS[0]), bearer(KEYS[1]), {"Authorization": f"bearer {KEYS[1]}"}):  # any scheme case
        status, _, answer = guarded.post("/v1/embeddings", {"input": ["piano"]}, headers)
        assert status == 200, answer
        np.testing.assert_allclose(answer["data"][0]["embedding"], library.embed_text(["piano"])[0], atol=ATOL)
    assert guarded.metric("synergy_unauthorized_total", bearer(KEYS[0])) >= 5


def test_the_openai_clients_api_key_is_the_bearer_token(guarded, library):
    client = openai_client(guarded, KEYS[1])
    response = client.embeddings.create(model="tiny", input=["a red circle"])
    np.testing.assert_allclose(response.data[0].embedding, library.embed_text(["a red circle"])[0], atol=ATOL)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError, match="not valid"):
        openai_client(guarded, "wrong-key").embeddings.create(model="tiny", input=["piano"])
    with pytest.raises(openai.AuthenticationError):
        openai_client(guarded, "wrong-key").models.list()


def test_cors_preflight_answers_the_allowed_origin_only(guarded):
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = guarded.request("OPTIONS", "/v1/embeddings", headers={"Origin": ORIGIN, **asked})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()

    status, headers, _ = guarded.request("OPTIONS", "/v1/embeddings", headers={"Origin": "https://evil.test", **asked})
    assert status != 200 and "Access-Control-Allow-Origin" not in headers

    # the page can read the answers, 401s included, and Server-Timing
    status, headers, _ = guarded.post("/v1/embeddings", {"input": ["piano"]}, {"Origin": ORIGIN, **bearer(KEYS[0])})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "server-timing" in headers["Access-Control-Expose-Headers"].lower()
    status, headers, _ = guarded.post("/v1/embeddings", {"input": ["piano"]}, {"Origin": ORIGIN})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, headers, _ = guarded.post("/v1/embeddings", {"input": ["piano"]}, {"Origin": "https://evil.test"})
    assert status == 401 and "Access-Control-Allow-Origin" not in headers


def test_metrics_public_opens_only_metrics(bundle):
    server = Server(bundle, "--api-key", KEYS[0], "--metrics-public", env={"SYNERGY_API_KEY": KEYS[1]})
    try:
        status, _, text = server.get("/metrics")
        assert status == 200 and "synergy_unauthorized_total 0" in text
        assert server.get("/v1/models")[0] == 401
        assert server.get("/v1/models", bearer(KEYS[0]))[0] == 200
        assert server.get("/v1/models", bearer(KEYS[1]))[0] == 401  # --api-key overrides the variable's keys
    finally:
        assert server.stop() == 0


def test_keys_that_could_never_be_sent_are_refused_without_quoting_them():
    from synergy.runtime import InferUsageError
    from synergy.serve.auth import check_keys

    assert check_keys(KEYS) == KEYS
    for key in ("", " padded", "two words", "tab\tkey"):
        with pytest.raises(InferUsageError, match="API key #2") as refused:
            check_keys([KEYS[0], key])
        assert not key or key not in str(refused.value)
