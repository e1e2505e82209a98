#!/usr/bin/env python3
"""A second, independently written emulation of an Ollama node, for the routing benchmark.

It differs on purpose from the Rust emulator (tests/emulator), so that routing is not tuned to one
emulation's quirks:
- compute is shared: k requests running at once each run 1 + 0.3 (k - 1) times slower (a GPU batching
  them), up to --slots at once; the rest wait in arrival order;
- a load stops the whole node (every request waits for it), takes --load-seconds +-30 % (seeded), and
  evicts the least recently used model past --max-loaded;
- its timings are noisy (+-10 %), tokens are generated in bursts of 1-4 (a streamed answer is written
  in one piece at its end), and `load_duration` is missing from one answer in four (a router must
  learn loads from the wall clock too);
- `/api/ps` writes `expires_at` with a numeric offset (`+00:00`), as Ollama does outside UTC.

Usage: ollama_sim.py --name fast --decode 120 --slots 2 --load-seconds 1.5 --max-loaded 3
Prints `listening on http://127.0.0.1:PORT` once ready. Standard library only.
"""
import argparse
import hashlib
import json
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Node:
    def __init__(self, args):
        self.args = args
        self.random = random.Random(args.seed)
        self.lock = threading.Condition()
        self.running = 0
        self.loading = False
        self.loaded = {}  # model -> (last used, expires at)
        self.tickets = 0  # arrival order of waiting requests
        self.next_ticket = 0

    def jitter(self, spread):
        with self.lock:
            return 1.0 + self.random.uniform(-spread, spread)

    def acquire_slot(self):
        with self.lock:
            ticket = self.tickets
            self.tickets += 1
            while self.next_ticket != ticket or self.running >= self.args.slots or self.loading:
                self.lock.wait()
            self.next_ticket += 1
            self.running += 1
            self.lock.notify_all()

    def release_slot(self):
        with self.lock:
            self.running -= 1
            self.lock.notify_all()

    def slowdown(self):
        with self.lock:
            return 1.0 + 0.3 * max(0, self.running - 1)

    def ensure_loaded(self, model, keep_alive):
        """Loads `model` if needed (the whole node waits); returns the seconds spent loading."""
        started = time.monotonic()
        with self.lock:
            self.expire()
            while self.loading:
                self.lock.wait()
            if model in self.loaded:
                self.loaded[model] = (time.monotonic(), time.time() + keep_alive)
                return time.monotonic() - started
            self.loading = True
        try:
            time.sleep(self.args.load_seconds * self.jitter(0.3))
        finally:
            with self.lock:
                while len(self.loaded) >= self.args.max_loaded:
                    oldest = min(self.loaded, key=lambda name: self.loaded[name][0])
                    del self.loaded[oldest]
                self.loaded[model] = (time.monotonic(), time.time() + keep_alive)
                self.loading = False
                self.lock.notify_all()
        return time.monotonic() - started

    def expire(self):
        now = time.time()
        for name in [name for name, (_, expires) in self.loaded.items() if expires <= now]:
            del self.loaded[name]


def nanos(seconds):
    return int(seconds * 1e9)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    node = None

    def log_message(self, *args):
        pass

    def reply(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        node = self.node
        if self.path == "/":
            return self.reply(200, b"Ollama is running", "text/plain")
        if self.path == "/api/version":
            return self.reply(200, {"version": "0.12.3"})
        if self.path == "/api/tags":
            return self.reply(200, {"models": [
                {"name": model, "model": model, "size": 300_000_000,
                 "digest": hashlib.sha256(model.encode()).hexdigest(),
                 "details": {"family": "llama", "parameter_size": "1B", "quantization_level": "Q4_K_M"}}
                for model in node.args.models]})
        if self.path == "/api/ps":
            with node.lock:
                node.expire()
                loaded = sorted(node.loaded.items(), key=lambda item: -item[1][0])
            offset = timezone(timedelta(0))
            return self.reply(200, {"models": [
                {"name": model, "model": model, "size": 300_000_000, "size_vram": 300_000_000,
                 "expires_at": datetime.fromtimestamp(expires, offset).isoformat(timespec="microseconds")}
                for model, (_, expires) in loaded]})
        self.reply(404, {"error": "not found"})

    def do_POST(self):
        node = self.node
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self.reply(400, {"error": "invalid JSON"})
        if self.path not in ("/api/chat", "/api/generate"):
            return self.reply(404, {"error": "not found"})
        model = request.get("model", "")
        if ":" not in model:
            model += ":latest"
        if model not in node.args.models:
            return self.reply(404, {"error": f"model '{model}' not found"})
        keep_alive = 300.0
        chat = self.path == "/api/chat"
        text_field = "messages" if chat else "prompt"
        if request.get(text_field) is None:
            node.ensure_loaded(model, keep_alive)
            answer = {"model": model, "created_at": datetime.now(timezone.utc).isoformat(),
                      "done": True, "done_reason": "load"}
            answer["message" if chat else "response"] = {"role": "assistant", "content": ""} if chat else ""
            return self.reply(200, answer)
        if chat:
            prompt_chars = sum(len(m.get("content") or "") for m in request.get("messages") or [])
        else:
            prompt_chars = len(request.get("prompt") or "")
        prompt_tokens = max(1, prompt_chars // 4)
        tokens = int((request.get("options") or {}).get("num_predict") or 32)
        stream = request.get("stream", True)
        started = time.monotonic()
        load = node.ensure_loaded(model, keep_alive)
        node.acquire_slot()
        try:
            prompt_started = time.monotonic()
            time.sleep(prompt_tokens / node.args.prompt_rate * node.slowdown())
            prompt_time = time.monotonic() - prompt_started
            eval_started = time.monotonic()
            produced = 0
            chunks = []
            while produced < tokens:
                burst = min(tokens - produced, node.random.randint(1, 4))
                time.sleep(burst / node.args.decode * node.slowdown())
                produced += burst
                chunks.append("tok " * burst)
            eval_time = time.monotonic() - eval_started
        finally:
            node.release_slot()
        total = time.monotonic() - started
        final = {"model": model, "created_at": datetime.now(timezone.utc).isoformat(), "done": True,
                 "done_reason": "length", "total_duration": nanos(total * node.jitter(0.1)),
                 "prompt_eval_count": prompt_tokens,
                 "prompt_eval_duration": nanos(prompt_time * node.jitter(0.1)),
                 "eval_count": tokens, "eval_duration": nanos(eval_time * node.jitter(0.1))}
        if node.random.random() >= 0.25:
            final["load_duration"] = nanos(load)
        content = "".join(chunks)
        if chat:
            final["message"] = {"role": "assistant", "content": "" if stream else content}
        else:
            final["response"] = "" if stream else content
        if not stream:
            return self.reply(200, final)
        lines = []
        for chunk in chunks:
            piece = {"model": model, "done": False}
            if chat:
                piece["message"] = {"role": "assistant", "content": chunk}
            else:
                piece["response"] = chunk
            lines.append(json.dumps(piece))
        lines.append(json.dumps(final))
        self.reply(200, ("\n".join(lines) + "\n").encode(), "application/x-ndjson")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="sim")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--decode", type=float, default=40.0)
    parser.add_argument("--prompt-rate", type=float, default=0.0)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--load-seconds", type=float, default=2.0)
    parser.add_argument("--max-loaded", type=int, default=1)
    parser.add_argument("--models", default="smollm2:135m,qwen2:0.5b,nomic-embed-text:latest")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    args.models = [name if ":" in name else name + ":latest" for name in args.models.split(",")]
    if args.prompt_rate <= 0:
        args.prompt_rate = args.decode * 10
    Handler.node = Node(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
