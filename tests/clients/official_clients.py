"""The official `ollama` and `openai` Python packages against a sollol gateway.

Usage: python official_clients.py http://127.0.0.1:PORT
The gateway must front nodes that have `smollm2:135m` and `nomic-embed-text` (the Rust test
`official_python_clients` starts such a cluster of emulated Ollama nodes). Prints one closing
line, "python clients: N passed, N failed", and exits non-zero on any failure.
"""

import sys

import httpx
import ollama
import openai

from checks import run_tests

GATEWAY = sys.argv[1]
CHAT_MODEL = "smollm2:135m"
EMBED_MODEL = "nomic-embed-text"
client = ollama.Client(host=GATEWAY)
oai = openai.OpenAI(base_url=GATEWAY + "/v1", api_key="unused")
MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_chat():
    response = client.chat(model=CHAT_MODEL, messages=MESSAGES, options={"num_predict": 3})
    assert response.message.role == "assistant", response
    assert response.message.content == "tok0 tok1 tok2 ", response.message.content
    assert response.done and response.eval_count == 3, response


def test_chat_streaming():
    parts = list(client.chat(model=CHAT_MODEL, messages=MESSAGES, stream=True, options={"num_predict": 4}))
    assert "".join(part.message.content for part in parts) == "tok0 tok1 tok2 tok3 ", parts
    assert parts[-1].done and parts[-1].eval_count == 4, parts[-1]


def test_generate_both_ways():
    response = client.generate(model=CHAT_MODEL, prompt="Hi", options={"num_predict": 2})
    assert response.response == "tok0 tok1 ", response
    streamed = "".join(part.response for part in client.generate(model=CHAT_MODEL, prompt="Hi", stream=True, options={"num_predict": 2}))
    assert streamed == "tok0 tok1 ", streamed


def test_embed_single_and_batch():
    single = client.embed(model=EMBED_MODEL, input="one")
    assert len(single.embeddings) == 1 and len(single.embeddings[0]) == 8, single
    batch = client.embed(model=EMBED_MODEL, input=["one", "two", "three"])
    assert len(batch.embeddings) == 3, batch
    assert batch.embeddings[0] == single.embeddings[0], "same input, same embedding, in order, numbers unchanged"
    legacy = client.embeddings(model=EMBED_MODEL, prompt="one")
    assert list(legacy.embedding) == single.embeddings[0], legacy


def test_list_ps_show_version():
    names = sorted(model.model for model in client.list().models)
    assert names == ["nomic-embed-text:latest", "smollm2:135m"], names
    client.chat(model=CHAT_MODEL, messages=MESSAGES, options={"num_predict": 1})
    loaded = client.ps().models
    assert any(model.model == CHAT_MODEL for model in loaded), loaded
    shown = client.show(CHAT_MODEL)
    assert shown.details.family == "llama", shown
    version = httpx.get(GATEWAY + "/api/version").json()["version"]
    assert version == "0.12.3", version


def test_unknown_model_raises_ollamas_error():
    try:
        client.chat(model="no-such-model", messages=MESSAGES)
    except ollama.ResponseError as error:
        assert error.status_code == 404 and "not found" in error.error, error
    else:
        raise AssertionError("no error for an unknown model")


def test_openai_chat():
    completion = oai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=3)
    assert completion.choices[0].message.content == "tok0 tok1 tok2 ", completion
    assert completion.usage.completion_tokens == 3, completion.usage


def test_openai_chat_streaming():
    stream = oai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=3, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "tok0 tok1 tok2 ", text


def test_openai_embeddings_and_models():
    embeddings = oai.embeddings.create(model=EMBED_MODEL, input=["a", "b"])
    assert [item.index for item in embeddings.data] == [0, 1], embeddings
    ids = sorted(model.id for model in oai.models.list().data)
    assert ids == ["nomic-embed-text:latest", "smollm2:135m"], ids


if __name__ == "__main__":
    run_tests("python clients", globals())
