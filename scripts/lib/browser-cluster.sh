# A small real cluster for browser checks and benchmarks: sourced, not run (after common.sh).
# start_browser_cluster BIN_DIR starts `ollama-emulator 2`, `sollol coordinator` (no calibration or warm-up, so
# counters equal what a test sends) and agents browser-node-a/-b on loopback, and sets: gateway, pids
# (everything started, stopped by the EXIT trap), coordinator_pid, doomed (browser-node-b's agent), work,
# cluster (the coordinator's cluster address) and token.

# Loopback only: no mDNS announcements on this machine's interfaces.
export SOLLOL_MDNS=false

work="$(mktemp -d)"
pids=()
cleanup_browser_cluster() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup_browser_cluster EXIT

browser_cluster_failed() {
  echo "cluster set-up failed: $1" >&2
  for log in "$work"/*.err; do echo "--- $log" >&2; tail -20 "$log" >&2; done
  exit 1
}

wait_for_line() { # FILE PATTERN
  for _ in $(seq 1 200); do
    grep -q -- "$2" "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

start_browser_cluster() {
  local bin="$1"
  "$bin/ollama-emulator" 2 >"$work/nodes.out" 2>"$work/nodes.err" &
  pids+=($!)
  wait_for_line "$work/nodes.out" '^http' || browser_cluster_failed "the emulated nodes did not start"
  sleep 0.2
  local node_urls
  mapfile -t node_urls <"$work/nodes.out"
  [ "${#node_urls[@]}" -eq 2 ] || browser_cluster_failed "expected 2 emulated nodes, got ${#node_urls[@]}"

  SOLLOL_CALIBRATION=false SOLLOL_WARMUP=false "$bin/sollol" coordinator --data-dir "$work/coordinator" \
    --gateway-bind 127.0.0.1:0 --cluster-bind 127.0.0.1:0 >"$work/coordinator.out" 2>"$work/coordinator.err" &
  coordinator_pid=$!
  pids+=($!)
  wait_for_line "$work/coordinator.out" 'Token:' || browser_cluster_failed "the coordinator did not start"
  gateway="$(awk '/Gateway:/ {print $2}' "$work/coordinator.out")"
  local name index=0
  cluster="$(awk '/Cluster:/ {print $2}' "$work/coordinator.out")"
  token="$(awk '/Token:/ {print $2; exit}' "$work/coordinator.out")"
  for name in browser-node-a browser-node-b; do
    SOLLOL_TOKEN="$token" "$bin/sollol" agent --data-dir "$work/$name" --join "$cluster" --name "$name" \
      --ollama-url "${node_urls[$index]}" --heartbeat-interval 300ms >"$work/$name.out" 2>"$work/$name.err" &
    pids+=($!)
    index=$((index + 1))
  done
  doomed="${pids[-1]}"
}

# start_peer_coordinator BIN_DIR starts a second `sollol coordinator` in the group of the one
# start_browser_cluster started (same token, that one as its peer), and sets peer_gateway.
start_peer_coordinator() {
  local bin="$1"
  SOLLOL_TOKEN="$token" SOLLOL_PEERS="$cluster" SOLLOL_NODE_NAME=browser-peer SOLLOL_CALIBRATION=false SOLLOL_WARMUP=false \
    "$bin/sollol" coordinator --data-dir "$work/peer" --gateway-bind 127.0.0.1:0 --cluster-bind 127.0.0.1:0 \
    >"$work/peer.out" 2>"$work/peer.err" &
  pids+=($!)
  wait_for_line "$work/peer.out" 'Gateway:' || browser_cluster_failed "the second coordinator did not start"
  peer_gateway="$(awk '/Gateway:/ {print $2}' "$work/peer.out")"
}

# start_distributed_cluster BIN_DIR MODELS_DIR starts `sollol coordinator` serving smollm2:135m split over
# two agents (distributed inference) whose models directory is MODELS_DIR (holding the test model as
# smollm2:135m.gguf), and sets distributed_gateway.
start_distributed_cluster() {
  local bin="$1" models="$2"
  SOLLOL_CALIBRATION=false SOLLOL_WARMUP=false SOLLOL_MODEL_SHARDING_ENABLED=true SOLLOL_DISTRIBUTED_MODELS=smollm2:135m \
    SOLLOL_PROBE_INTERVAL=300ms "$bin/sollol" coordinator --data-dir "$work/distributed" \
    --gateway-bind 127.0.0.1:0 --cluster-bind 127.0.0.1:0 >"$work/distributed.out" 2>"$work/distributed.err" &
  pids+=($!)
  wait_for_line "$work/distributed.out" 'Token:' || browser_cluster_failed "the distributed coordinator did not start"
  distributed_gateway="$(awk '/Gateway:/ {print $2}' "$work/distributed.out")"
  local cluster token name
  cluster="$(awk '/Cluster:/ {print $2}' "$work/distributed.out")"
  token="$(awk '/Token:/ {print $2; exit}' "$work/distributed.out")"
  for name in stage-left stage-right; do
    SOLLOL_TOKEN="$token" SOLLOL_MODELS_DIR="$models" SOLLOL_ENGINE=off RAYON_NUM_THREADS=1 \
      "$bin/sollol" agent --data-dir "$work/$name" --join "$cluster" --name "$name" \
      --heartbeat-interval 300ms >"$work/$name.out" 2>"$work/$name.err" &
    pids+=($!)
  done
}

# start_keyed_coordinator BIN_DIR KEY starts `sollol coordinator` with the API key KEY (name
# "dashboard") and one agent in front of the first emulated node started by start_browser_cluster,
# and sets keyed_gateway.
start_keyed_coordinator() {
  local bin="$1" key="$2"
  SOLLOL_API_KEYS="dashboard=$key" SOLLOL_CALIBRATION=false SOLLOL_WARMUP=false "$bin/sollol" coordinator \
    --data-dir "$work/keyed" --gateway-bind 127.0.0.1:0 --cluster-bind 127.0.0.1:0 \
    >"$work/keyed.out" 2>"$work/keyed.err" &
  pids+=($!)
  wait_for_line "$work/keyed.out" 'Token:' || browser_cluster_failed "the keyed coordinator did not start"
  keyed_gateway="$(awk '/Gateway:/ {print $2}' "$work/keyed.out")"
  local cluster token node_url
  cluster="$(awk '/Cluster:/ {print $2}' "$work/keyed.out")"
  token="$(awk '/Token:/ {print $2; exit}' "$work/keyed.out")"
  node_url="$(head -n 1 "$work/nodes.out")"
  SOLLOL_TOKEN="$token" "$bin/sollol" agent --data-dir "$work/keyed-node" --join "$cluster" --name keyed-node \
    --ollama-url "$node_url" --heartbeat-interval 300ms >"$work/keyed-node.out" 2>"$work/keyed-node.err" &
  pids+=($!)
}
