"""The official `ollama` Python package pulling a model onto one node through a sollol gateway, where another
node's agent already has it: the model is copied node to node (no registry), then the node answers a greedy
chat with llama.cpp's reference continuation (tests/reference/smollm2-135m-q4_1.llamacpp.json).

Usage: model_copy.py GATEWAY_URL NODE MODEL DIGEST (DIGEST: the SHA-256 of the model file, `sha256:…`).
Prints "model copy: N passed, N failed" and exits non-zero on any failure.
"""

import json
import pathlib
import sys

import ollama

from checks import run_tests

GATEWAY, NODE, MODEL, DIGEST = sys.argv[1:5]
on_node = ollama.Client(host=GATEWAY, headers={"X-Sollol-Node": NODE})
REFERENCE = json.loads(
    (pathlib.Path(__file__).parent.parent / "reference" / "smollm2-135m-q4_1.llamacpp.json").read_text()
)["completions"][0]
# llama-server's greedy has no repeat penalty; Ollama's default is 1.1.
GREEDY = {"temperature": 0, "num_predict": 16, "seed": 1, "repeat_penalty": 1.0}


def test_pull_copies_from_a_node_that_has_the_model():
    parts = list(on_node.pull(MODEL, stream=True))
    assert parts[-1].status == "success", parts[-1]
    layers = [part for part in parts if part.digest]
    assert layers, parts
    assert all(part.digest == DIGEST for part in layers), layers
    assert all(part.status.startswith("copying ") for part in layers), layers
    assert all(0 <= part.completed <= part.total for part in layers), layers
    assert layers[-1].completed == layers[-1].total, layers[-1]


def test_the_copy_answers_with_the_reference_text():
    question = [{"role": "user", "content": REFERENCE["user_message"]}]
    response = on_node.chat(model=MODEL, messages=question, options=GREEDY)
    text = response.message.content
    assert REFERENCE["output_text"].startswith(text) and len(text) > 40, (text, REFERENCE["output_text"])


def test_a_second_pull_finds_it_there():
    parts = list(on_node.pull(MODEL, stream=True))
    assert parts[-1].status == "success", parts[-1]


if __name__ == "__main__":
    run_tests("model copy", globals())
