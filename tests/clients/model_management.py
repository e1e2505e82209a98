"""The official `ollama` Python package managing models through a sollol gateway.

Usage: python model_management.py http://127.0.0.1:PORT
The gateway must front three nodes named a, b and c that have `smollm2:135m` and not `tinyllama:1b`
(the Rust test `the_official_ollama_client_manages_models_through_the_gateway` starts such a cluster of
emulated Ollama nodes). Prints one closing line, "model management: N passed, N failed", and exits
non-zero on any failure.
"""

import os
import sys
import tempfile
import time

import ollama

from checks import run_tests

GATEWAY = sys.argv[1]
client = ollama.Client(host=GATEWAY)
every_node = ollama.Client(host=GATEWAY, headers={"X-Sollol-Nodes": "all"})


def listed(name, wanted=True, within=10.0):
    """Waits until the gateway's model list has (or no longer has) `name`."""
    deadline = time.monotonic() + within
    while True:
        names = [model.model for model in client.list().models]
        if (name in names) == wanted:
            return
        assert time.monotonic() < deadline, f"{name} listed: {name in names}, wanted {wanted}: {names}"
        time.sleep(0.1)


def test_pull_on_every_node_shows_one_progress_stream():
    parts = list(every_node.pull("tinyllama:1b", stream=True))
    assert parts[-1].status == "success", parts[-1]
    layers = [part for part in parts if part.digest]
    assert layers, parts
    assert all(0 <= part.completed <= part.total for part in layers), layers
    assert layers[-1].completed == layers[-1].total, layers[-1]
    listed("tinyllama:1b")


def test_copy_then_delete_everywhere():
    assert client.copy("smollm2:135m", "mine:v1").status == "success"
    listed("mine:v1")
    assert client.delete("mine:v1").status == "success"
    listed("mine:v1", wanted=False)
    try:
        client.delete("mine:v1")
    except ollama.ResponseError as error:
        assert error.status_code == 404, error
    else:
        raise AssertionError("deleting a model no node has succeeded")


def test_create_from_an_uploaded_file():
    with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as weights:
        weights.write(os.urandom(256 * 1024))
    try:
        digest = client.create_blob(weights.name)
    finally:
        os.unlink(weights.name)
    created = client.create(model="uploaded", files={"model.gguf": digest})
    assert created.status == "success", created
    listed("uploaded:latest")


def test_a_name_that_is_a_path_is_refused():
    for name in ["../../etc/passwd", "a/../b"]:
        try:
            client.pull(name)
        except ollama.ResponseError as error:
            assert error.status_code == 400, error
        else:
            raise AssertionError(f"pulling {name!r} succeeded")


if __name__ == "__main__":
    run_tests("model management", globals())
