"""The official ollama and openai packages against the gateway, for a model the coordinator serves split
across agents' stages (distributed inference): greedy chat, whole and streamed, must give llama.cpp's
reference continuation (tests/reference/smollm2-135m-q4_1.llamacpp.json), as the model whole does.

Usage: distributed_clients.py GATEWAY_URL MODEL. Prints "distributed clients: N passed, N failed".
"""

import json
import pathlib
import sys
import traceback

import ollama
import openai

gateway, model = sys.argv[1], sys.argv[2]
client = ollama.Client(host=gateway)
REFERENCE = json.loads(
    (pathlib.Path(__file__).parent.parent / "reference" / "smollm2-135m-q4_1.llamacpp.json").read_text()
)["completions"][0]
QUESTION = [{"role": "user", "content": REFERENCE["user_message"]}]
# llama-server's greedy has no repeat penalty; Ollama's default is 1.1.
GREEDY = {"temperature": 0, "num_predict": 16, "seed": 1, "repeat_penalty": 1.0}
passed = failed = 0
answers = {}


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


def chat_whole():
    response = client.chat(model=model, messages=QUESTION, options=GREEDY)
    text = response.message.content
    assert REFERENCE["output_text"].startswith(text) and len(text) > 40, (text, REFERENCE["output_text"])
    assert response.eval_count == 16 and response.prompt_eval_count == len(REFERENCE["prompt_ids"]), response
    assert response.eval_duration > 0 and response.prompt_eval_duration > 0, response
    answers["whole"] = text


def chat_stream():
    pieces = list(client.chat(model=model, messages=QUESTION, options=GREEDY, stream=True))
    assert pieces[-1].done and pieces[-1].eval_count == 16, pieces[-1]
    text = "".join(piece.message.content for piece in pieces)
    assert text == answers.get("whole"), (text, answers.get("whole"))


def openai_chat():
    # OpenAI requests keep Ollama's default repeat penalty: compare with an Ollama chat that does too.
    ollama_text = client.chat(
        model=model, messages=QUESTION, options={"temperature": 0, "num_predict": 16}
    ).message.content
    openai_client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused")
    response = openai_client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=16, seed=1
    )
    assert response.choices[0].message.content == ollama_text, (response, ollama_text)


def listed():
    names = [entry.model for entry in client.list().models]
    assert model in names, names


check("chat", chat_whole)
check("chat streaming", chat_stream)
check("openai chat", openai_chat)
check("list", listed)
print(f"distributed clients: {passed} passed, {failed} failed")
sys.exit(0 if failed == 0 else 1)
