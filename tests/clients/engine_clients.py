"""The official ollama Python package against the gateway in front of an agent serving the test model with
sollol's built-in engine: chat streaming and not, generate, list, ps, show, embed and the legacy embeddings;
and the openai package: chat streaming and not, embeddings (base64, as the client asks by default, and float);
structured outputs with both (a pydantic model's JSON schema, streamed and not, "json", json_object, the
openai parse helper, an unusable schema refused).
Embeddings are compared with llama.cpp's (tests/reference/smollm2-135m-q4_1.embeddings.llamacpp.json).

Usage: engine_clients.py GATEWAY_URL MODEL TOOLS_MODEL (the same model with a chat template that renders
tools, tests/fixtures/tools-template.jinja beside it). Prints "engine clients: N passed, N failed"; exits 1 on failure.
"""

import json
import math
import pathlib
import sys
import traceback

from typing import Literal

import ollama
import openai
import pydantic

gateway, model, tools_model = sys.argv[1], sys.argv[2], sys.argv[3]
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
    listed = {entry.model: entry for entry in client.list().models}
    assert model in listed, list(listed)
    assert listed[model].details.family == "llama", listed[model].details
    running = [entry.model for entry in client.ps().models]
    assert model in running, running
    shown = client.show(model)
    assert shown.details.family == "llama" and shown.details.quantization_level == "Q4_1", shown.details


openai_client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused")


def openai_chat():
    response = openai_client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=16, seed=1
    )
    assert response.choices[0].message.content == answers.get("whole"), response
    assert response.usage.completion_tokens == 16 and response.choices[0].finish_reason == "length"


def openai_chat_stream():
    chunks = list(openai_client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=16, seed=1, stream=True
    ))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == answers.get("whole"), (text, answers.get("whole"))
    assert chunks[-1].choices[0].finish_reason == "length"


REFERENCE = json.loads(
    (pathlib.Path(__file__).parent.parent / "reference" / "smollm2-135m-q4_1.embeddings.llamacpp.json").read_text()
)["cases"]


def unit(vector):
    length = math.sqrt(sum(value * value for value in vector))
    return [value / length for value in vector]


def close(ours, theirs, tolerance=1e-4):
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    assert worst <= tolerance, worst


def embed():
    texts = [case["text"] for case in REFERENCE[:2]]
    response = client.embed(model=model, input=texts)
    assert len(response.embeddings) == 2, len(response.embeddings)
    for vector, case in zip(response.embeddings, REFERENCE):
        close(vector, unit(case["embedding"]))
    assert response.prompt_eval_count == sum(len(case["ids"]) for case in REFERENCE[:2]), response


def legacy_embeddings():
    response = client.embeddings(model=model, prompt=REFERENCE[2]["text"])
    # The legacy endpoint returns the pooled vector as computed, not normalised.
    close(response.embedding, REFERENCE[2]["embedding"])


def openai_embeddings():
    texts = [case["text"] for case in REFERENCE]
    response = openai_client.embeddings.create(model=model, input=texts)
    assert [item.index for item in response.data] == [0, 1, 2]
    for item, case in zip(response.data, REFERENCE):
        close(item.embedding, unit(case["embedding"]))
    assert response.usage.prompt_tokens == sum(len(case["ids"]) for case in REFERENCE), response.usage
    floats = openai_client.embeddings.create(model=model, input=texts[0], encoding_format="float")
    close(floats.data[0].embedding, unit(REFERENCE[0]["embedding"]))


class Cat(pydantic.BaseModel):
    """What the structured-output checks ask for; pydantic validates the answers (the schema's
    constraints included), as applications using these clients do."""

    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=30)
    friendly: bool
    colour: Literal["black", "white", "ginger", "grey"]


CAT_QUESTION = [{"role": "user", "content": "Describe a cat: its name, its age, whether it is friendly."}]
LONG = {"temperature": 0, "num_predict": 200, "seed": 1}


def structured_chat():
    response = client.chat(model=model, messages=CAT_QUESTION, format=Cat.model_json_schema(), options=LONG)
    Cat.model_validate_json(response.message.content)
    assert response.done_reason == "stop", response.done_reason


def structured_chat_stream():
    pieces = list(client.chat(model=model, messages=CAT_QUESTION, format=Cat.model_json_schema(), options=LONG, stream=True))
    assert len(pieces) > 5, len(pieces)
    Cat.model_validate_json("".join(piece.message.content for piece in pieces))


def structured_generate_json():
    response = client.generate(model=model, prompt="A JSON object about the sea.", format="json", options=LONG)
    assert isinstance(json.loads(response.response), dict), response.response


def structured_refusal():
    try:
        client.chat(model=model, messages=CAT_QUESTION, format={"type": "object", "properties": {"a": {"type": "wat"}}})
    except ollama.ResponseError as refused:
        assert refused.status_code == 400 and "invalid format" in refused.error, (refused.status_code, refused.error)
    else:
        raise AssertionError("an unusable schema was accepted")


def openai_structured():
    schema = {"name": "cat", "schema": Cat.model_json_schema(), "strict": True}
    answer = openai_client.chat.completions.create(
        model=model, messages=CAT_QUESTION, max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": schema},
    )
    Cat.model_validate_json(answer.choices[0].message.content)
    chunks = openai_client.chat.completions.create(
        model=model, messages=CAT_QUESTION, max_tokens=200, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": schema},
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    Cat.model_validate_json(streamed)
    anything = openai_client.chat.completions.create(
        model=model, messages=CAT_QUESTION, max_tokens=200, temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def openai_parse():
    # The client's own helper: it sends the pydantic model's schema and parses the answer.
    parsed = openai_client.chat.completions.parse(
        model=model, messages=CAT_QUESTION, max_tokens=200, temperature=0, response_format=Cat,
    )
    assert isinstance(parsed.choices[0].message.parsed, Cat), parsed.choices[0].message


def refused(action, needle):
    try:
        action()
    except (ollama.ResponseError, openai.BadRequestError) as refusal:
        status = getattr(refusal, "status_code", None)
        text = str(refusal)
        assert status == 400 and needle in text, (status, text)
    else:
        raise AssertionError(f"accepted; expected a 400 with {needle!r}")


def capabilities_refused():
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    tool = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    refused(lambda: client.chat(model=model, messages=ask, tools=[tool]), "does not support tools")
    refused(lambda: client.chat(model=model, messages=ask, think=True), "does not support thinking")
    refused(lambda: client.generate(model=model, prompt="What is this?", images=[b"\x89PNG not really"]), "does not support vision")
    refused(lambda: client.generate(model=model, prompt="def add(a, b):", suffix="    return total"), "does not support insert")
    refused(lambda: openai_client.chat.completions.create(model=model, messages=ask, tools=[tool]), "does not support tools")


def context_and_num_ctx():
    first = client.generate(model=model, prompt="My name is Ada.", options=GREEDY)
    assert first.context and len(first.context) == first.prompt_eval_count + first.eval_count, (len(first.context or []), first.prompt_eval_count, first.eval_count)
    second = client.generate(model=model, prompt="What is my name?", context=first.context, options=GREEDY)
    # The earlier exchange came first: the second prompt holds it (its BOS, if any, only once).
    assert second.prompt_eval_count > len(first.context), (second.prompt_eval_count, len(first.context))
    refused(lambda: client.generate(model=model, prompt="hi", options={"num_ctx": 10_000_000}), "larger than the model's context")
    refused(lambda: client.generate(model=model, prompt="word " * 100, options={"num_ctx": 32}), "the context holds 32")


WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                          "required": ["city"], "additionalProperties": False}}}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


def openai_tool_calls():
    # The client requires a call: the model can only answer with one, which comes back parsed.
    answer = openai_client.chat.completions.create(
        model=tools_model, messages=PARIS, tools=[WEATHER], tool_choice="required", max_tokens=100, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "weather", call
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments.get("city"), str), arguments
    # Streamed, naming the function.
    chunks = list(openai_client.chat.completions.create(
        model=tools_model, messages=PARIS, tools=[WEATHER], max_tokens=100, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "weather"}}))
    streamed = [call for chunk in chunks if chunk.choices for call in (chunk.choices[0].delta.tool_calls or [])]
    assert streamed and streamed[0].function.name == "weather", chunks
    assert chunks[-1].choices[0].finish_reason == "tool_calls", chunks[-1]
    # The round trip: the call and its result go back, the model answers in text.
    followed = openai_client.chat.completions.create(model=tools_model, tools=[WEATHER], max_tokens=30, temperature=0, messages=PARIS + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."},
    ])
    assert isinstance(followed.choices[0].message.content, str), followed


def ollama_tools():
    # The Ollama API cannot require a call: the model answers in text or with calls, both accepted,
    # and an earlier call with its result renders through the template.
    free = client.chat(model=tools_model, messages=PARIS, tools=[WEATHER], options={"temperature": 0, "num_predict": 60})
    assert free.message.content or free.message.tool_calls, free
    for call in free.message.tool_calls or []:
        assert call.function.name == "weather" and isinstance(call.function.arguments, dict), call
    followed = client.chat(model=tools_model, tools=[WEATHER], options={"temperature": 0, "num_predict": 30}, messages=PARIS + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "Sunny, 21 degrees.", "tool_name": "weather"},
    ])
    assert followed.done and isinstance(followed.message.content, str), followed


check("chat", chat_whole)
check("chat streaming", chat_stream)
check("generate", generate)
check("list, ps, show", listing)
check("openai chat", openai_chat)
check("openai chat streaming", openai_chat_stream)
check("embed", embed)
check("legacy embeddings", legacy_embeddings)
check("openai embeddings", openai_embeddings)
check("structured chat (JSON schema)", structured_chat)
check("structured chat streaming", structured_chat_stream)
check("structured generate (json)", structured_generate_json)
check("an unusable schema is refused", structured_refusal)
check("openai structured outputs (json_schema, streamed, json_object)", openai_structured)
check("openai parse helper", openai_parse)
check("tools, thinking, images, suffix refused as Ollama does", capabilities_refused)
check("generate context, num_ctx", context_and_num_ctx)
check("openai tool calls (required, streamed, round trip)", openai_tool_calls)
check("ollama tools (free choice, round trip)", ollama_tools)
print(f"engine clients: {passed} passed, {failed} failed")
sys.exit(0 if failed == 0 else 1)
