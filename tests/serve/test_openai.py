"""The stock ``openai`` client against a real ``synergy serve`` process: embeddings (text by default, float and base64,
a string or a list), models, and the errors it turns into its own exceptions; answers equal the library's."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from .conftest import clip_bytes

openai = pytest.importorskip("openai", reason="the openai client is not installed (synergy-clip[dev])")
pytest.importorskip("starlette", reason="synergy-clip[serve] is not installed (starlette, uvicorn, python-multipart)")

ATOL = 2e-6
TEXTS = ["a red circle", "piano", "the sound of a bird song"]


@pytest.fixture(scope="module")
def client(server):
    # trust_env=False: a proxy set in the environment must not see loopback requests
    http = openai.DefaultHttpxClient(trust_env=False)
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", http_client=http, max_retries=0)
    http.close()


def test_the_stock_call_embeds_text_like_the_library(client, library):
    response = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    assert response.object == "list" and response.model == "tiny"
    assert [item.index for item in response.data] == [0, 1, 2] and {item.object for item in response.data} == {
        "embedding"
    }
    np.testing.assert_allclose([item.embedding for item in response.data], library.embed_text(TEXTS), atol=ATOL)
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)  # tokens, not items

    floats = client.embeddings.create(model="tiny", input="piano", encoding_format="float")
    assert len(floats.data) == 1
    np.testing.assert_allclose(floats.data[0].embedding, library.embed_text(["piano"])[0], atol=ATOL)
    same = client.embeddings.create(model="tiny", input="piano", dimensions=library.manifest.embed_dim)
    np.testing.assert_allclose(same.data[0].embedding, floats.data[0].embedding, atol=ATOL)


def test_base64_is_the_float32_vector_bytes(client, library):
    raw = client.embeddings.create(model="tiny", input=["piano"], encoding_format="base64")
    vector = np.frombuffer(base64.b64decode(raw.data[0].embedding), "<f4")
    np.testing.assert_allclose(vector, library.embed_text(["piano"])[0], atol=ATOL)


def test_audio_goes_through_the_same_call_with_its_modality(client, library):
    clip = clip_bytes(0.5, 440)
    response = client.embeddings.create(
        model="tiny", input=[base64.b64encode(clip).decode()], extra_body={"modality": "audio"}
    )
    np.testing.assert_allclose(response.data[0].embedding, library.embed_audio([clip])[0], atol=ATOL)
    assert response.usage.prompt_tokens == 0


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.models.retrieve("gpt-4")


def test_what_the_model_cannot_do_is_refused_in_the_clients_own_errors(client):
    with pytest.raises(openai.NotFoundError, match="no model named 'text-embedding-3-small'.*serves 'tiny'"):
        client.embeddings.create(model="text-embedding-3-small", input=["piano"])
    with pytest.raises(openai.BadRequestError, match="dimensions=8.*21-d"):
        client.embeddings.create(model="tiny", input=["piano"], dimensions=8)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.embeddings.create(model="tiny", input=[[101, 2023, 102]])
    with pytest.raises(openai.BadRequestError, match="encoding_format"):
        client.embeddings.create(model="tiny", input=["piano"], extra_body={"encoding_format": "int8"})
