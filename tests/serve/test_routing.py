"""Two bundles in one ``synergy serve`` process (serve/routing.py): the stock ``openai`` client reaches each by its
``model``, each answers as the library does for its own bundle, an unknown or a missing model is refused naming the
served ones, /readyz and /v1/models cover both, and each model has its own metric series."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from .conftest import LABELS, Server, clip_bytes, runtime_fixtures

openai = pytest.importorskip("openai", reason="the openai client is not installed (synergy-clip[dev])")
pytest.importorskip("starlette", reason="synergy-clip[serve] is not installed (starlette, uvicorn, python-multipart)")

ATOL = 2e-6
TEXTS = ["a red circle", "piano", "the sound of a bird song"]


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory):
    """The tiny bundle's shapes and tokenizer with other weights: a second model."""
    folder = tmp_path_factory.mktemp("serve-other") / "other"
    runtime_fixtures.build_bundle(folder, seed=1)
    return folder


@pytest.fixture(scope="module")
def other_library(other_bundle):
    from synergy.runtime import Runtime

    rt = Runtime.open(other_bundle, threads=1)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def two(bundle, other_bundle, labels_file):
    """A bare path (named after its folder, "tiny", as a one-bundle server names it) and a NAME=PATH."""
    running = Server([str(bundle), f"second={other_bundle}"], labels=labels_file)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(two):
    http = openai.DefaultHttpxClient(trust_env=False)  # a proxy set in the environment must not see loopback
    yield openai.OpenAI(base_url=two.url + "/v1", api_key="unused", http_client=http, max_retries=0)
    http.close()


def test_each_model_answers_the_openai_client_as_its_own_bundle_does(client, library, other_library):
    first = client.embeddings.create(model="tiny", input=TEXTS)
    second = client.embeddings.create(model="second", input=TEXTS)
    assert first.model == "tiny" and second.model == "second"
    np.testing.assert_allclose([item.embedding for item in first.data], library.embed_text(TEXTS), atol=ATOL)
    np.testing.assert_allclose([item.embedding for item in second.data], other_library.embed_text(TEXTS), atol=ATOL)
    assert not np.allclose(library.embed_text(TEXTS), other_library.embed_text(TEXTS), atol=0.01)  # two models

    clip = base64.b64encode(clip_bytes(0.5, 440)).decode()
    audio = client.embeddings.create(model="second", input=[clip], extra_body={"modality": "audio"})
    np.testing.assert_allclose(audio.data[0].embedding, other_library.embed_audio([clip_bytes(0.5, 440)])[0], atol=ATOL)


def test_models_lists_both_and_an_unknown_one_is_a_404_naming_them(client, two):
    assert [m.id for m in client.models.list().data] == ["tiny", "second"]
    assert client.models.retrieve("second").id == "second"
    with pytest.raises(openai.NotFoundError, match="no model named 'gpt-4'; this server serves 'tiny', 'second'"):
        client.embeddings.create(model="gpt-4", input=["piano"])
    with pytest.raises(openai.NotFoundError, match="serves 'tiny', 'second'"):
        client.models.retrieve("gpt-4")
    status, _, answer = two.post("/v1/classify", {"model": "gpt-4", "labels": list(LABELS), "text": ["piano"]})
    assert status == 404 and answer["error"]["type"] == "ModelNotFound", answer


def test_a_request_without_model_must_choose_when_several_are_served(two):
    for path, payload in (
        ("/v1/embeddings", {"input": ["piano"]}),
        ("/v1/classify", {"labels": list(LABELS), "text": ["piano"]}),
    ):
        status, _, answer = two.post(path, payload)
        assert status == 400 and answer["error"]["type"] == "ModelRequired", answer
        assert "'tiny', 'second'" in answer["error"]["message"] and "'model'" in answer["error"]["message"]
    status, _, answer = two.post("/v1/embeddings", {"model": 3, "input": ["piano"]})
    assert status == 400 and "model must be a string" in answer["error"]["message"]


def test_classify_is_routed_by_model_too(two, library, other_library):
    clips = [clip_bytes(0.5, 300), clip_bytes(0.5, 900)]
    audio = [base64.b64encode(c).decode() for c in clips]
    for name, runtime in (("tiny", library), ("second", other_library)):
        status, _, answer = two.post(
            "/v1/classify", {"model": name, "labels": "animals", "audio": audio, "top_k": len(LABELS)}
        )
        assert status == 200 and answer["model"] == name, answer
        for row, prediction in zip(answer["data"], runtime.classify(list(LABELS), audio=clips, top_k=len(LABELS))):
            got = {t["label"]: t["probability"] for t in row["top"]}
            np.testing.assert_allclose(
                [got[s.label] for s in prediction.top], [s.probability for s in prediction.top], atol=1e-5
            )


def test_readiness_and_metrics_cover_each_model(two):
    status, _, ready = two.get("/readyz")
    assert status == 200 and list(ready["models"]) == ["tiny", "second"]
    # the start line names each bundle's engine (what --backend auto chose; this suite's exports: onnxruntime)
    assert re.search(r"\(bundles tiny=\S+ on onnxruntime, second=\S+ on onnxruntime\)", two.started), two.started
    before = {m: two.metric(f'synergy_items_total{{modality="text",model="{m}"}}') for m in ("tiny", "second")}
    assert two.post("/v1/embeddings", {"model": "second", "input": ["dog", "cat"]})[0] == 200
    after = {m: two.metric(f'synergy_items_total{{modality="text",model="{m}"}}') for m in ("tiny", "second")}
    assert after == {"tiny": before["tiny"], "second": before["second"] + 2}  # the other model's series did not move
    text = two.get("/metrics")[2]
    for model in ("tiny", "second"):
        assert f'synergy_queue_depth{{modality="audio",model="{model}"}} 0' in text
    assert two.metric('synergy_requests_total{endpoint="embeddings",model="second",code="200"}') >= 1


def test_bundle_values_name_the_models():
    from synergy.runtime import InferUsageError
    from synergy.serve.routing import bundles_by_name

    assert bundles_by_name(["runs/a/bundle", "small=runs/b/bundle"]) == {
        "bundle": "runs/a/bundle",
        "small": "runs/b/bundle",
    }
    with pytest.raises(InferUsageError, match="two bundles are named 'bundle'.*NAME=PATH"):
        bundles_by_name(["runs/a/bundle", "runs/b/bundle"])
    with pytest.raises(InferUsageError, match="give NAME=PATH"):
        bundles_by_name(["has space=runs/a/bundle"])
