"""Distributed benchmark, llama.cpp RPC's side (run by scripts/bench/distributed): the same model split over
two `rpc-server`s (1 thread each, so 2 threads in all, like ours) driven by `llama-bench`, every RPC
connection through the same userspace relay as ours (agent/examples/distributed_bench.rs, `relay` mode),
on loopback and the two emulated links. Prints one JSON object per link.

Bytes per generated token: llama.cpp uploads the weights to the servers at every load, so the relays'
byte counts of a 16-token run are subtracted from a 64-token run's, over the 48 tokens between.

Usage: distributed_llamacpp.py BUILD_DIR MODEL.gguf RELAY_BINARY
"""

import json
import socket
import subprocess
import sys
import time

build, model, relay_binary = sys.argv[1], sys.argv[2], sys.argv[3]
LINKS = [("loopback", 0, 0), ("1 Gbit/s, 0.5 ms", 500, 125_000_000), ("100 Mbit/s, 5 ms (Wi-Fi-like)", 5000, 12_500_000)]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port):
    for _ in range(200):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"rpc-server on {port} never listened")


servers = []
ports = []
for _ in range(2):
    port = free_port()
    servers.append(subprocess.Popen([f"{build}/bin/ggml-rpc-server", "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    ports.append(port)
for port in ports:
    wait_listening(port)


def bench(link, tokens, prompt):
    """One llama-bench run through fresh relays: (its JSON result, bytes the relays carried)."""
    _, delay, rate = link
    relays = [subprocess.Popen([relay_binary, "relay", f"127.0.0.1:{port}", str(delay), str(rate)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for port in ports]
    addresses = [relay.stdout.readline().strip() for relay in relays]
    run = subprocess.run([f"{build}/bin/llama-bench", "-m", model, "--rpc", ",".join(addresses), "-ngl", "99",
                          "-p", str(prompt), "-n", str(tokens), "-r", "1", "-t", "1", "-o", "json"],
                         capture_output=True, text=True, timeout=600)
    carried = 0
    for relay in relays:
        relay.stdin.close()
        carried += int(relay.stdout.readline().strip() or 0)
        relay.wait(timeout=10)
    if run.returncode != 0:
        raise SystemExit(f"llama-bench failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout), carried


try:
    for link in LINKS:
        prompt_run, _ = bench(link, 0, 64)
        short, short_bytes = bench(link, 16, 0)
        long, long_bytes = bench(link, 64, 0)
        print(json.dumps({
            "setup": "llama.cpp RPC, 2 servers x 1 thread",
            "link": link[0],
            "pp64_tokens_per_s": prompt_run[0]["avg_ts"],
            "tg_tokens_per_s": long[0]["avg_ts"],
            "bytes_per_token": (long_bytes - short_bytes) / 48,
        }), flush=True)
finally:
    for server in servers:
        server.kill()
