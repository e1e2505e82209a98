"""The official ollama Python package against the gateway in front of an agent serving the test model with
sollol's built-in engine: chat streaming and not, generate, list, ps, show.

Usage: engine_clients.py GATEWAY_URL MODEL. Prints "engine clients: N passed, N failed"; exits 1 on failure.
"""

import sys
import traceback

import ollama

gateway, model = sys.argv[1], sys.argv[2]
client = ollama.Client(host=gateway)
passed = 0
failed = 0
GREEDY = {"temperature": 0, "num_predict": 16, "seed": 1}
QUESTION = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]


def check(name, action):
    global passed, failed
    try:
        action()
        passed += 1
        print(f"ok: {name}")
    except Exception:  # noqa: BLE001 - every failure is reported, then counted
        failed += 1
        print(f"FAILED: {name}")
        traceback.print_exc()


answers = {}


def chat_whole():
    response = client.chat(model=model, messages=QUESTION, options=GREEDY)
    text = response.message.content
    assert text.startswith("The sky"), text
    assert response.eval_count == 16, response.eval_count
    assert response.prompt_eval_count == 40, response.prompt_eval_count
    assert response.eval_duration > 0 and response.total_duration >= response.eval_duration
    answers["whole"] = text


def chat_stream():
    pieces = list(client.chat(model=model, messages=QUESTION, options=GREEDY, stream=True))
    assert len(pieces) > 5, len(pieces)
    assert pieces[-1].done and pieces[-1].eval_count == 16
    text = "".join(piece.message.content for piece in pieces)
    # Greedy decoding is deterministic: streamed and whole answers agree.
    assert text == answers.get("whole"), (text, answers.get("whole"))


def generate():
    response = client.generate(model=model, prompt="What is 2 + 2?", options={"num_predict": 8, "seed": 3})
    assert response.done and 0 < response.eval_count <= 8, response


def listing():
    names = [entry.model for entry in client.list().models]
    assert model in names, names
    running = [entry.model for entry in client.ps().models]
    assert model in running, running
    shown = client.show(model)
    assert shown.details.family == "llama" and shown.details.quantization_level == "Q4_1", shown.details


check("chat", chat_whole)
check("chat streaming", chat_stream)
check("generate", generate)
check("list, ps, show", listing)
print(f"engine clients: {passed} passed, {failed} failed")
sys.exit(0 if failed == 0 else 1)
