"""Engine benchmark, llama.cpp's side (llama-cpp-python): pp64 and tg64 on the same GGUF with the same
threads, best of RUNS, and the process's peak RSS. Prints one JSON line. Run by scripts/bench/engine.

Usage: engine_llamacpp.py MODEL.gguf THREADS RUNS
"""

import json
import resource
import sys
import time

from llama_cpp import Llama

path, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
started = time.perf_counter()
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512, verbose=False)
load = time.perf_counter() - started
prompt = [1000 + index * 37 for index in range(64)]
best_prompt = best_generation = float("inf")
for _ in range(runs):
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    best_prompt = min(best_prompt, time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(64):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([token])
    best_generation = min(best_generation, time.perf_counter() - started)
print(json.dumps({
    "engine": "llama.cpp (llama-cpp-python)",
    "load_s": round(load, 3),
    "pp64_tokens_per_s": round(64 / best_prompt, 1),
    "tg64_tokens_per_s": round(64 / best_generation, 1),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
}))
